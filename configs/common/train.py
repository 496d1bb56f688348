"""Settings of ``tools/lazyconfig_train_net.py`` (the YAML keys they stand for in brackets)."""

train = dict(
    output_dir="./output",  # OUTPUT_DIR
    init_checkpoint="",  # MODEL.WEIGHTS
    max_iter=90000,  # SOLVER.MAX_ITER
    # SOLVER.AMP.ENABLED, .PRECISION (CUDA) and .CPU_BFLOAT16 ("native": bfloat16 only on a CPU
    # with bfloat16 instructions, else float32; "always")
    amp=dict(enabled=False, precision="float16", cpu_bfloat16="native"),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),  # SOLVER.CHECKPOINT_PERIOD
    eval_period=0,  # TEST.EVAL_PERIOD (0: evaluate once, at the end)
    log_period=20,
    device="cuda",  # MODEL.DEVICE ("cpu" where CUDA is not available)
    seed=0,  # SEED
)
