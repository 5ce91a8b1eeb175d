"""Data: dataset loaders (:mod:`.sources`), prompt/response tokenization (:mod:`.formatting`)
and federated partitioning (:mod:`.partition`). Submodules are imported on demand."""
