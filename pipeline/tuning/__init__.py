"""Mixed-precision tuning: the fewest layers kept out of INT8 so that an accuracy budget holds.

* :mod:`.layers`: the quantizable layers of an ONNX graph (a weighted node and what TensorRT
  fuses with it), their MACs, and the `build.layer_precisions` that keep a set of them;
* :mod:`.budget`: the budget in the gate's terms, measured on a candidate's outputs;
* :mod:`.cost`: the CPU latency estimate (MACs x a relative cost per precision);
* :mod:`.methods`: calibration method per layer (max|x| ranges instead of calibrate's);
* :mod:`.ort_candidates` / :mod:`.trt_candidates`: what measures a candidate (the
  onnxruntime Q/DQ simulation on a CPU, a TensorRT engine on a GPU);
* :mod:`.search`: the per-layer sensitivity passes and the search strategies (by
  sensitivity, Polygraphy-style contiguous bisection, first-and-last);
* :mod:`.plot`: tune.png, the accuracy-cost frontier.

The stage that drives them is :mod:`pipeline.stages.tune`.
"""
