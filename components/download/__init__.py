"""The download stage: a URL list (uid, url, caption, passthrough columns) in, webdataset shards and a
per-sample manifest out, through img2dataset."""
