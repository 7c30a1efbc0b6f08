"""The smallest (and largest) export settings that can work; torch-free, so that ``pcedge export --help``
and its argument checks run before torch is imported."""

#: Eq. 7 weighs m* against its b nearest neighbours in M, m* itself first: with b = 1 the weight is
#: 1 - exp(d)/exp(d) = 0 and every image scores 0.
MIN_REWEIGHT_B = 2
#: hnswlib refuses M = 1 and crashes on M = 0.
MIN_HNSW_M = 2
#: An FPR below this cannot be calibrated even by the Gaussian tail (z would exceed 4.75 sigma); above
#: MAX_TARGET_FPR, half the good parts would be rejected.
MIN_TARGET_FPR = 1e-6
MAX_TARGET_FPR = 0.5
#: A memory bank of one row gives every image the same verdict.
MIN_CORESET_COUNT = 2


def coreset_count_problem(n: int, reweight: bool, b: int, spec: str) -> str | None:
    """Why a memory bank of ``n`` rows cannot score (None if it can): at least MIN_CORESET_COUNT rows, and
    with Eq. 7 at least ``b`` (the neighbourhood N_b(m*) is drawn from the bank)."""
    need = max(MIN_CORESET_COUNT, b if reweight else 1)
    if n >= need:
        return None
    why = (f"Eq. 7 needs the b = {b} nearest neighbours of m* in the memory bank" if reweight and b > 1
           else "a one-row memory bank cannot tell images apart")
    return f"--coreset {spec} keeps {n} memory feature(s): too few ({why}); keep at least {need}, e.g. --coreset {need}"
