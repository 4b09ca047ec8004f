"""The Kaggle models, one short file each: the torch class beside its Keras twin. They import their framework,
so workloads load them only in the stages that train."""
