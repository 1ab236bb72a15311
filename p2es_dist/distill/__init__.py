"""Teacher -> mobile student distillation (`p2es distill`).

    teacher_outputs  Ray Data actor-pool inference of the teacher's few-step sampler, cached as Parquet
                     shards keyed by the teacher's weights digest, sampler, steps, seed and the data
    prune            kernel significance (Li et al. eq. 11) and channel pruning of a trained student
    run              the orchestration: teacher outputs -> train -> prune -> fine-tune -> ONNX

The student itself is `p2es_dist.models.student` (model name "student": Li et al.'s recursive lightweight
network); its ONNX export and int8 weights are `p2es_dist.export.onnx_io` and `p2es_dist.export.quantize`.
"""
