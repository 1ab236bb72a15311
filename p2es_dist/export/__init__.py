"""Publishable bundles (`bundle`, README "Distillation, bundles, translation"), their model card, and the mobile
files: ONNX (`onnx_io`), int8 ONNX weights (`quantize`), TorchScript (`mobile`); a student built with
`use_template` exports through `template_graph` (template, mask and upstroke inputs, the population embedded).
Reading and writing weights, and `load_model`, are `p2es_dist.models.checkpoint`."""
