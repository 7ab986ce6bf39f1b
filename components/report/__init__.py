"""The curation report: funnel over the listed curation steps, the steps' figures, kept/dropped examples."""
