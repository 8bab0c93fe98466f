"""`python -m avengers.models`: every registered variant with its size and training cost."""

from avengers.models.registry import get_model_spec, list_variants


def main() -> None:
    print(f"{'variant':<24} {'family':<12} {'params':>10} {'GFLOP/token@seq':>18}  description")
    for name in list_variants():
        spec = get_model_spec(name)
        n = spec.num_params()
        gflops = spec.flops_per_token(spec.max_seq_len) / 1e9
        print(
            f"{name:<24} {spec.family:<12} {n / 1e9:>9.3f}B {gflops:>12.2f}@{spec.max_seq_len:<5}  {spec.description}"
        )


if __name__ == "__main__":
    main()
