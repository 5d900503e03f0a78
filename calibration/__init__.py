"""INT8 calibration for trtpipe: |x| histograms, TensorRT's EntropyCalibration2 (and the
MinMax / percentile alternatives), and the TensorRT calibration cache format.

Kept import-light on purpose: import the submodules you need
(`calibration.histogram`, `calibration.algorithms`, `calibration.cache`)."""
