"""Why supervised CroVCA loses at short codes: how many distinct class codes the prototype targets leave.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_supervised_codes.py

Uses the default run's data and feature cache (fedhash train defaults: Fashion-MNIST, 96 px, 10,000 training
images x 4 views). For each code length and epoch count it trains the supervised head and reports mAP@1000, the
number of distinct class codes (the sign of each class's mean database logits) and the smallest Hamming distance
between two classes' codes.
"""
import numpy as np

from hashing.codes import logits_to_codes
from hashing.metrics import retrieval_metrics
from hashing.config import Config
from hashing.pipeline import prepare
from hashing.train import fit


def main() -> None:
    prep = prepare(Config(n_images=0))  # fedhash train's data: all 70,000 images
    y, q, db, tr = prep.ds.labels, prep.splits.query, prep.splits.database, prep.splits.train
    qf, dbf = np.asarray(prep.clean[q], np.float32), np.asarray(prep.clean[db], np.float32)
    classes = np.unique(y)
    print("| bits | epochs | mAP@1000 | distinct class codes (of 10) | min Hamming between class codes |")
    print("|---|---|---|---|---|")
    for bits in (16, 32, 64):
        for epochs in (5, 20):
            coder, _ = fit(prep.train_views, y[tr], Config(bits=bits, supervised=True, epochs=epochs))
            dl = coder.encode_features(dbf)
            protos = np.stack([(dl[y[db] == c].mean(0) > 0) for c in classes]).astype(np.int8)
            ham = (protos[:, None, :] != protos[None, :, :]).sum(-1)
            off = ham[~np.eye(len(classes), dtype=bool)]
            m = retrieval_metrics(coder.encode_features(qf), logits_to_codes(dl), y[q], y[db], asymmetric=False,
                                  pr=False)["mAP@1000"]
            print(f"| {bits} | {epochs} | {m:.4f} | {len({tuple(p) for p in protos})} | {off.min()} |", flush=True)


if __name__ == "__main__":
    main()
