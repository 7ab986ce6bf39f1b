"""The curation report: funnel, score histogram, entry rank-frequency, kept/dropped examples, rewrite examples."""
