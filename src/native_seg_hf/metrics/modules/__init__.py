"""`evaluate` module scripts, one metric each, loaded by path: `native_seg_hf.metrics.load_metric(name)`.

They are a package only so that wheels ship them; import `native_seg_hf.metrics` for the functions.
"""
