"""MetaCLIP balancing: match captions against metadata entries, then subsample head entries towards t."""
