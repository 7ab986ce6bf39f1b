"""The validate stage: Great Expectations suites at the pipeline's data boundaries (``clipmill stage validate
<boundary>``), with results as JSON and HTML data docs."""
