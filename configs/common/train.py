"""Settings of ``tools/lazyconfig_train_net.py`` (the YAML keys they stand for in brackets)."""

train = dict(
    output_dir="./output",  # OUTPUT_DIR
    init_checkpoint="",  # MODEL.WEIGHTS
    max_iter=90000,  # SOLVER.MAX_ITER
    amp=dict(enabled=False),  # SOLVER.AMP.ENABLED (CUDA: float16; CPU: bfloat16 where native)
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),  # SOLVER.CHECKPOINT_PERIOD
    eval_period=0,  # TEST.EVAL_PERIOD (0: evaluate once, at the end)
    log_period=20,
    device="cuda",  # MODEL.DEVICE ("cpu" where CUDA is not available)
    seed=0,  # SEED
)
