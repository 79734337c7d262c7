"""Reduced-precision graphs from the FP32 export: FP16 with precision in the graph (:mod:`.fp16`) and
INT8 as explicit Q/DQ ONNX for TensorRT 10/11 and ONNX Runtime (:mod:`.int8`, calibration data in
:mod:`.readers`). Import the submodules you need; nothing is imported here, so ``galr.calibration``
stays cheap.
"""
