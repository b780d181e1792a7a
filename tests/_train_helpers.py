"""Small trainer configurations shared by the training tests (overrides of configs/tiny.yaml)."""

# End-to-end runs on the bundled corpus, small enough for 2 CPU cores; the memory layer is real (product keys,
# shared values at two layers).
RUN_SMALL = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.multiple_of=32",
    "model.memory.layers=[0,1]", "model.memory.n_keys=16", "model.memory.heads=2", "model.memory.knn=4",
    "model.memory.k_dim=16", "data.seq_len=32", "train.batch_size=4", "train.log_every=1",
    "train.val_every=0", "train.val_batches=2", "optim.warmup_steps=5",
]

# Single training steps on random tokens (no data loader): smaller still, 5 steps.
STEP_SMALL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.multiple_of=16",
    "model.vocab_size=4096", "model.memory.layers=[0,1]", "model.memory.n_keys=8", "model.memory.heads=2",
    "model.memory.knn=4", "model.memory.k_dim=8", "optim.warmup_steps=2", "optim.lr=1e-2",
    "optim.value_lr=3e-2", "data.seq_len=16", "train.steps=5",
]
