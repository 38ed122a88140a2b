"""The per-step accuracy counters against a row-by-row count."""
import torch

from train.metrics import Tally, topk_hits


def naive_counts(recon, base_out, labels, k=5):
    ranked = [row.argsort(descending=True).tolist() for row in recon]
    base = base_out.argmax(1).tolist()
    labels = labels.tolist()
    return [sum(r[0] == t for r, t in zip(ranked, base)), sum(t in r[:k] for r, t in zip(ranked, base)),
            sum(r[0] == t for r, t in zip(ranked, labels)), sum(t in r[:k] for r, t in zip(ranked, labels))]


def test_tally_matches_row_by_row_counts():
    gen = torch.Generator().manual_seed(3)
    tally, expected, total = Tally(), [0, 0, 0, 0], 0
    for m in (7, 20):
        recon = torch.randn(m, 10, generator=gen)
        base_out = recon + 3.0 * torch.randn(m, 10, generator=gen)  # agrees often, not always
        labels = torch.randint(0, 10, (m,), generator=gen)
        tally.add(recon, base_out, labels, torch.tensor(2.0))
        expected = [a + b for a, b in zip(expected, naive_counts(recon, base_out, labels))]
        total += m
    res = tally.result("val", 0.5)
    assert 0 < expected[0] < expected[1] < total  # the data exercises both hits and misses
    assert res["val_recon_acc"] == expected[0] / total
    assert res["val_recon_top5"] == expected[1] / total
    assert res["val_degraded_acc"] == expected[2] / total
    assert res["val_degraded_top5"] == expected[3] / total
    assert res["val_loss"] == 2.0 and res["val_base_acc"] == 0.5


def test_topk_hits_with_fewer_classes_than_k():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]])
    targets = torch.tensor([[1, 2], [1, 0]])
    hits = topk_hits(scores, targets, 5)  # k is capped at the 3 classes: every target is a top-k hit
    assert hits.tolist() == [[1, 2], [1, 2]]


def test_group_hits_serve_f_where_available_and_the_reconstruction_elsewhere():
    from train.metrics import group_hits
    from coders.scenarios import enumerate_scenarios, unavailable_data

    torch.manual_seed(0)
    k, r, b, n = 3, 2, 4, 5
    unavailable = unavailable_data(enumerate_scenarios(k, r), k)
    recon = torch.randn(len(unavailable), b, k, n)
    base_out = torch.randn(b, k, n)
    labels = torch.randint(0, n, (b, k))
    correct = 0
    for s in range(len(unavailable)):
        for g in range(b):
            for j in range(k):
                answer = recon[s, g, j] if unavailable[s, j] else base_out[g, j]
                correct += int(answer.argmax() == labels[g, j])
    hits = group_hits(recon, base_out, labels, unavailable)
    assert hits.tolist() == [correct, len(unavailable) * b * k]
