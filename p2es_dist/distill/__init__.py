"""Teacher -> mobile student distillation (`p2es distill`).

    teacher_outputs  Ray Data actor-pool inference of the teacher's few-step sampler, cached as Parquet
                     shards keyed by the teacher's weights digest, sampler, steps, seed and the data
    student          the one-step student (model name "student"): Li et al.'s recursive lightweight network
    prune            kernel significance (Li et al. eq. 11) and channel pruning of a trained student
    onnx_io          ONNX export of a student and its parity check against PyTorch
    quantize         int8 quantisation of the ONNX graph (onnxruntime.quantization)
    run              the orchestration: teacher outputs -> train -> prune -> fine-tune -> ONNX
"""
