"""QLoRA on Ray Train: the driver, the worker recipe (set-up, restore, steps) and what it is made of: model loading,
backends, DDP/ZeRO strategies, the CUDA-graphed step, flat parameters, the chunked loss, checkpoints, the step
recorder, tasks and the profiler."""
