"""Ray Train + DeepSpeed training of every model in `p2es_dist.models` (`p2es train`, `p2es pretrain`)."""
