"""The benchmarks and checks that scripts/ runs (kv_bench, train_bench,
kvsplice_bench, kvsplice_validate, gpu_check, gpu_cost_cli, recovery_cli), and
what they share: V-cache benchmark measurements and reports, models at set
shapes, the GPU cost model."""
