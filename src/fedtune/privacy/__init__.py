"""Differential privacy: client-level DP of uploads (:mod:`.client_dp`), its accountant (:mod:`.accountant`) and
sample-level DP-SGD through Opacus (:mod:`.dp_sgd`)."""
