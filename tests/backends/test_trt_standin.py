"""The TensorRT stand-ins (tests/backends/trt_standin.py) export what each version's bindings
export, and nothing that version removed."""

from __future__ import annotations

import pytest

from tests.backends.trt_standin import make_trt


@pytest.mark.parametrize("version", ["10.16.0", "11.1.0"])
def test_standin_follows_the_bindings(version):
    trt = make_trt(version)
    eleven = version.startswith("11")
    assert hasattr(trt, "IInt8EntropyCalibrator2") is not eleven
    assert hasattr(trt.BuilderFlag, "FP16") is not eleven and hasattr(trt.BuilderFlag, "INT8") is not eleven
    assert hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS") is not eleven
    assert hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") is not eleven
    assert hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    assert not hasattr(trt.PreviewFeature, "FASTER_DYNAMIC_SHAPES_0805")  # gone in 10.0
    config = trt.Builder(None).create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 20)
    assert trt._rec.memory_pools == {"WORKSPACE": 1 << 20} and trt._rec.missing == []
    if eleven:
        with pytest.raises(AttributeError, match="int8_calibrator"):
            config.int8_calibrator = object()
        with pytest.raises(AttributeError, match="set_calibration_profile"):
            config.set_calibration_profile
        assert trt._rec.missing == ["IBuilderConfig.int8_calibrator", "IBuilderConfig.set_calibration_profile"]
    with pytest.raises(AttributeError):
        config.max_workspace_size = 1  # gone since 10.0
