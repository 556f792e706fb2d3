"""Measuring and deploying: counting MACs and parameters, latency, adversarial robustness, and the ONNX /
TorchScript / int8 exports checked in ONNX Runtime.
"""
