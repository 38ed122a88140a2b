"""The simulator's served predictions, computed offline in batches: F's argmax for own answers, the trained
decoder's reconstruction from exactly the outputs in hand for reconstructed ones, an N-worker code's own
computation, the backup model's answers. See serve/simulator/simulate.py's docstring."""
from __future__ import annotations

import numpy as np

from serve.core.plan import Plan, is_nworker
from serve.core.strategies import get as strategy_of


def served_predictions(plan: Plan, group_of, available, reconstructed: np.ndarray, code, inputs, batch: int,
                       backup=None) -> np.ndarray:
    """Every query's served prediction, from who answered it (``reconstructed``: by decoding, or for ``backup`` by
    the backup model) and what each group had in hand (``available``); -1 without a code and inputs, and for
    ``nworker`` of a systematic run (its latency alone, no N-worker code)."""
    n = len(plan.queries.arrival)
    if code is None or inputs is None:
        return np.full(n, -1)
    kind = strategy_of(plan.strategy)
    if kind.grouped and not kind.own_outputs:  # answered by an N-worker code's decoder only
        if not is_nworker(code):
            return np.full(n, -1)
        return nworker_predictions(plan, group_of, available, reconstructed, code, inputs, batch)
    coded = kind.grouped
    predicted = predictions(plan, group_of if coded else None, available if coded else None,
                            reconstructed if coded else np.zeros(n, dtype=bool), code, inputs, batch)
    if kind.approximate_copy and backup is not None and reconstructed.any():
        import torch

        with torch.no_grad():
            images = inputs[torch.as_tensor(plan.queries.index[reconstructed])]
            predicted[reconstructed] = torch.cat([backup(images[i:i + 4096]) for i in
                                                  range(0, len(images), 4096)]).argmax(1).numpy()
    return predicted


def group_inputs(plan: Plan, groups: np.ndarray, inputs):
    """``(members, real, x)`` of ``groups``: their member queries ((B, k), -1 for blank padding), which slots
    hold one, and the k inputs of each group ((B, k, ...)) with blank padding as zeros, as the frontend encodes
    them."""
    import torch

    members = plan.members[groups]
    real = members >= 0
    img = np.where(real, plan.queries.index[np.maximum(members, 0)], 0)
    x = inputs[torch.as_tensor(img.reshape(-1))].reshape(len(groups), plan.k, *inputs.shape[1:]).clone()
    x[torch.as_tensor(~real)] = 0.0
    return members, real, x


def predictions(plan: Plan, group_of: np.ndarray, available: np.ndarray, reconstructed: np.ndarray, code, inputs,
                batch: int) -> np.ndarray:
    """F's argmax for own answers; the decoder's reconstruction from the outputs in hand for reconstructed ones
    (``available``: (groups, k + r), which outputs each group had when it decoded)."""
    import torch

    q = plan.queries
    images, where = np.unique(q.index, return_inverse=True)
    with torch.no_grad():
        fx = torch.cat([code.base(inputs[torch.as_tensor(images[i:i + 4096])]) for i in range(0, len(images), 4096)])
        pad_output = code.base(torch.zeros(1, *inputs.shape[1:]))[0]
    predicted = fx.argmax(1).numpy()[where]
    if not reconstructed.any():
        return predicted
    k = plan.k
    groups = np.unique(group_of[reconstructed])
    for lo in range(0, len(groups), batch):
        g = groups[lo:lo + batch]
        members, real, x = group_inputs(plan, g, inputs)
        with torch.no_grad():
            own = fx[torch.as_tensor(where[np.maximum(members, 0)].reshape(-1))].reshape(len(g), k, -1).clone()
            own[torch.as_tensor(~real)] = pad_output
            parity = code.parity_outputs(code.encode(x))
            recon = code.decode(torch.cat([own, parity], 1), torch.as_tensor(available[g]))
        pick = real & reconstructed[np.maximum(members, 0)]
        rows, cols = np.nonzero(pick)
        predicted[members[rows, cols]] = recon[torch.as_tensor(rows), torch.as_tensor(cols)].argmax(-1).numpy()
    return predicted


def nworker_predictions(plan: Plan, group_of: np.ndarray, available: np.ndarray, reconstructed: np.ndarray, code,
                        inputs, batch: int) -> np.ndarray:
    """An N-worker code's served predictions: F's argmax for queries answered by a retry (their own output), and
    for the rest the code itself (:class:`coders.nworker.NWorkerCode`: encode, F on every coded input, decode) on
    the group's members, from the outputs ``available`` ((groups, N)) when it decoded."""
    import torch

    predicted = predictions(plan, None, None, np.zeros(len(reconstructed), dtype=bool), code, inputs, batch)
    groups = np.unique(group_of[reconstructed])
    for lo in range(0, len(groups), batch):
        g = groups[lo:lo + batch]
        members, real, x = group_inputs(plan, g, inputs)
        with torch.no_grad():  # the decode the Ray frontend runs (a served perturbation seeded per group)
            recon = code.decode_groups(code.worker_outputs(code.encode(x)), torch.as_tensor(available[g]), g.tolist())
        rows, cols = np.nonzero(real & reconstructed[np.maximum(members, 0)])
        predicted[members[rows, cols]] = recon[torch.as_tensor(rows), torch.as_tensor(cols)].argmax(-1).numpy()
    return predicted
