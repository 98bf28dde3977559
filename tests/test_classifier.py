"""The C2T classifier: scoring op (CPU path, Triton kernel) vs reference, module save/load, the tree
dataset, and training on a synthetic rule."""

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from c2t_fast import ops
from c2t_fast import reference as ref
from c2t_fast.decoding.classifier import C2TClassifier, ClassifierConfig
from c2t_fast.training.tree_dataset import TreeRecorder, open_tree_dataset
from c2t_fast.training.classifier import TrainConfig, select_epoch, train_classifier
from c2t_fast.kernels.triton.score_children import score_children as triton_score_children


def _logits(kind, n, V, gen):
    if kind == "random":
        return torch.randn(n, V, generator=gen) * 3
    if kind == "peaked":  # top-M mass almost 1
        x = torch.randn(n, V, generator=gen)
        x[:, :3] += 40
        return x
    if kind == "uniform":  # near-uniform rows: H close to log V over the top-M
        return torch.randn(n, V, generator=gen) * 1e-3
    x = torch.randn(n, V, generator=gen)  # rows with -inf entries: p = 0 inside the top-M
    x[:, V // 2:] = float("-inf")
    return x


def _weights(h, gen, zero_cols=()):
    w1 = torch.randn(h, 3, generator=gen)
    for c in zero_cols:
        w1[:, c] = 0
    return w1, torch.randn(h, generator=gen), torch.randn(1, h, generator=gen), torch.randn(1, generator=gen)


def _compare(got, want, beta):
    conf, keep, tok, clp, ent = got
    rconf, rkeep, rtok, rclp, rent = want
    torch.testing.assert_close(conf, rconf, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(clp, rclp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent, rent, rtol=1e-4, atol=1e-4)
    assert torch.equal(tok, rtok)
    clear = (rconf - beta).abs() > 1e-4  # away from the threshold the decision must agree
    assert torch.equal(keep[clear], rkeep[clear])
    assert not torch.isnan(conf).any() and not torch.isnan(ent).any()


CASES = [  # (n, V, M, K, h)
    (1, 50, 50, 1, 1), (15, 1000, 100, 15, 48), (3, 4099, 1000, 10, 64), (7, 300, 17, 16, 12), (0, 64, 16, 4, 8),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["random", "peaked", "uniform", "masked"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("log_p", [False, True])
def test_cpu_path_matches_reference(case, kind, dtype, log_p, poison):
    n, V, M, K, h = case
    gen = torch.Generator().manual_seed(n * 7 + V)
    logits = _logits(kind, n, V, gen).to(dtype)
    tv, ti = torch.topk(logits, M)
    parent = -torch.rand(n, generator=gen) * 4
    w = _weights(h, gen)
    poison("cpu")
    got = ops.score_children(logits, tv, ti, parent, 3, K, w, 0.5, log_p)
    _compare(got, ref.score_children(logits, tv, ti, parent, 3, K, *w, 0.5, log_p), 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["random", "peaked", "masked"])
@pytest.mark.parametrize("case", CASES[:4])
def test_triton_kernel_matches_reference(case, kind, dtype):
    n, V, M, K, h = case
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(V + K)
    logits = _logits(kind, n, V, gen).to(dtype).to(device)
    tv, ti = torch.topk(logits, M)
    parent = (-torch.rand(n, generator=gen) * 4).to(device)
    w = tuple(t.to(device) for t in _weights(h, gen))
    got = triton_score_children(logits, tv, ti, parent, 2, K, *w, 0.3, False)
    _compare(got, ref.score_children(logits, tv, ti, parent, 2, K, *w, 0.3, False), 0.3)


def test_entropy_of_a_near_uniform_row_is_log_v():
    V = 1000
    logits = torch.zeros(1, V)
    tv, ti = torch.topk(logits, V)
    s = ops.score_children(logits, tv, ti, torch.zeros(1), 0, 5, _weights(4, torch.Generator()), 0.5)
    assert abs(s.entropy.item() - np.log(V)) < 1e-4
    assert torch.allclose(s.child_logp, torch.full((1, 5), -float(np.log(V))))


def test_opcheck_score_children():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 200, generator=gen)
    tv, ti = torch.topk(logits, 50)
    torch.library.opcheck(torch.ops.c2t_fast.score_children.default,
                          (logits, tv, ti, torch.zeros(4), 1, 5, *_weights(8, gen), 0.5, False))


@pytest.mark.parametrize("mutate, message", [
    (lambda a: {**a, "k": 60}, "k = 60 must be in"),
    (lambda a: {**a, "ti": a["ti"].int()}, "top_indices must be int64"),
    (lambda a: {**a, "parent": torch.zeros(3)}, "parent_logp must be"),
    (lambda a: {**a, "w": (torch.zeros(8, 2),) + a["w"][1:]}, "W1 \\[h, 3\\]"),
    (lambda a: {**a, "w": tuple(t.double() for t in a["w"])}, "float32"),
    (lambda a: {**a, "w": _weights(65, torch.Generator())}, "hidden size 65"),
    (lambda a: {**a, "logits": a["logits"].long()}, "logits must be floating"),
])
def test_score_children_bad_inputs(mutate, message):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 200, generator=gen)
    tv, ti = torch.topk(logits, 50)
    a = mutate(dict(logits=logits, tv=tv, ti=ti, parent=torch.zeros(4), k=5, w=_weights(8, gen)))
    with pytest.raises(ValueError, match=message):
        ops.score_children(a["logits"], a["tv"], a["ti"], a["parent"], 1, a["k"], a["w"], 0.5)


@pytest.mark.parametrize("features", [["P", "H", "d"], ["P", "H"], ["P", "d"], ["P"], ["H", "d"]])
@pytest.mark.parametrize("log_p", [False, True])
def test_module_kernel_weights_reproduce_the_module(features, log_p, tmp_path):
    """Feature subsets and log-P are selected by the config alone; the fused op agrees with the module."""
    torch.manual_seed(0)
    model = C2TClassifier(ClassifierConfig(hidden=12, features=features, log_p=log_p))
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=gen) * 2
    tv, ti = torch.topk(logits, 100)
    parent = -torch.rand(6, generator=gen)
    s = ops.score_children(logits, tv, ti, parent, 4, 8, model.kernel_weights(), 0.5, log_p)
    feats = torch.stack([s.child_logp.exp(), s.entropy[:, None].expand(-1, 8), torch.full((6, 8), 4.0)], -1)
    torch.testing.assert_close(s.confidence, model.confidence(feats).detach(), rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = C2TClassifier.from_pretrained(str(tmp_path))
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(feats), model(feats))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no C2T classifier"):
        C2TClassifier.from_pretrained(str(tmp_path / "missing"))
    C2TClassifier(ClassifierConfig(hidden=8)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden": 16}))
    with pytest.raises(ValueError, match="does not match its config"):
        C2TClassifier.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        C2TClassifier.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        C2TClassifier.from_pretrained(str(tmp_path))


def test_recorder_streams_and_appends(tmp_path):
    path = str(tmp_path / "trees")
    gen = np.random.default_rng(0)
    with TreeRecorder(path, {"source": "test"}, chunk_rows=100) as rec:
        for _ in range(30):
            n = int(gen.integers(1, 20))
            rec.add_tree(gen.random(n), gen.random(n) * 5, gen.integers(0, 10, n), gen.random(n) < 0.1)
        assert os.path.getsize(os.path.join(path, "rows.bin")) > 0  # flushed in chunks before closing
    first = open_tree_dataset(path)
    with TreeRecorder(path) as rec:
        rec.add_tree([0.5], [1.0], [0], [1])
    rows = open_tree_dataset(path)
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    assert len(rows) == len(first) + 1 == meta["rows"] and meta["trees"] == 31 and meta["source"] == "test"
    assert rows["tree"][-1] == 30 and meta["positives"] == int(rows["label"].sum())
    with pytest.raises(ValueError, match="equal lengths"):
        TreeRecorder(path).add_tree([0.1, 0.2], [1.0], [0], [1])
    # rows written after the last meta (a run killed between the two writes) are dropped on reopening
    with open(os.path.join(path, "rows.bin"), "ab") as f:
        f.write(np.zeros(3, rows.dtype).tobytes())
    TreeRecorder(path).close()
    assert len(open_tree_dataset(path)) == meta["rows"]
    with open(os.path.join(path, "rows.bin"), "ab") as f:
        f.write(b"xx")
    with pytest.raises(ValueError, match="truncated"):
        open_tree_dataset(path)


def _synthetic(path, trees=600, seed=0):
    """label = P * (1 + H / 10) > 0.45 (plus depth noise-free): P dominates, H helps at low P."""
    rng = np.random.default_rng(seed)
    with TreeRecorder(path) as rec:
        for _ in range(trees):
            n = 200
            P = rng.random(n) ** 3
            H = rng.random(n) * 6
            d = rng.integers(0, 10, n)
            rec.add_tree(P, H, d, (P * (1 + H / 10) > 0.45).astype(np.uint8))


def test_training_learns_a_known_rule(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "clf")
    _synthetic(data)
    report = train_classifier(data, out, TrainConfig(epochs=6, seed=0), progress=False)
    sel = report["selected"]
    base_rate = report["val_positives"] / report["val_rows"]
    assert sel["recall"] > 0.95
    assert sel["positive_rate"] < 2.5 * base_rate  # keeps few more nodes than the true positives
    assert os.path.isfile(os.path.join(out, "training.png")) and os.path.isfile(os.path.join(out, "report.json"))
    model = C2TClassifier.from_pretrained(out)
    x = torch.tensor([[0.9, 1.0, 0.0], [0.01, 1.0, 0.0]])
    assert model.confidence(x)[0] > 0.9 and model.confidence(x)[1] < 0.1
    # fine-tuning starts from the trained model, at lr 1e-4, on a fraction of the trees
    ft = train_classifier(data, str(tmp_path / "ft"), TrainConfig(epochs=2, finetune_from=out), progress=False)
    assert ft["config"]["finetune_from"] == out and ft["rows"] < report["rows"]


def test_selection_rule_prefers_recall_then_low_positive_rate():
    hist = [{"recall": 0.90, "positive_rate": 0.01}, {"recall": 0.97, "positive_rate": 0.20},
            {"recall": 0.968, "positive_rate": 0.05}, {"recall": 0.95, "positive_rate": 0.001}]
    assert select_epoch(hist, tolerance=0.005) == 2
    assert select_epoch(hist, tolerance=0.0) == 1
    for h, ap in zip(hist, (0.2, 0.1, 0.3, 0.3)):
        h["average_precision"] = ap
    assert select_epoch(hist, 0.005, by="average_precision") == 2  # the earliest of the best
    hist[0]["average_precision"] = float("nan")  # no validation positives: never above a number
    hist[1]["average_precision"] = 0.0
    assert select_epoch(hist[:2], 0.005, by="average_precision") == 1
    with pytest.raises(ValueError, match="select_by"):
        select_epoch(hist, 0.005, by="loss")


def _ranking_reference(conf, labels, share):
    """Average precision and top-share recall by counting, one node at a time (ties: input order)."""
    order = sorted(range(len(conf)), key=lambda i: -conf[i])
    hits, precisions = 0, []
    for rank, i in enumerate(order, 1):
        if labels[i]:
            hits += 1
            precisions.append(hits / rank)
    top = order[:max(1, round(share * len(conf)))]
    return sum(precisions) / len(precisions), sum(labels[i] for i in top) / sum(labels)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.booleans()), min_size=1, max_size=60),
       st.sampled_from([0.01, 0.1, 0.5, 1.0]))
def test_ranking_metrics_match_counting(pairs, share):
    from c2t_fast.training.classifier import ranking_metrics

    conf = [c for c, _ in pairs]
    labels = [int(y) for _, y in pairs]
    got = ranking_metrics(torch.tensor(conf, dtype=torch.float64), torch.tensor(labels, dtype=torch.float32), (share,))
    if sum(labels) == 0:
        assert np.isnan(got["average_precision"]) and np.isnan(got[f"recall_top{share:g}"])
        return
    ap, recall = _ranking_reference(conf, labels, share)
    assert got["average_precision"] == pytest.approx(ap) and got[f"recall_top{share:g}"] == pytest.approx(recall)


def test_split_is_recomputable_from_the_report(tmp_path):
    """The report's val_trees are what training_split gives for its config; whole trees on one side; in
    fine-tuning mode the rows outside the sampled trees are in neither split."""
    from c2t_fast.training.classifier import training_split

    data = str(tmp_path / "data")
    _synthetic(data, trees=40)
    trees = np.asarray(open_tree_dataset(data)["tree"])
    report = train_classifier(data, str(tmp_path / "clf"), TrainConfig(epochs=1, min_steps=1, val_fraction=0.25),
                              progress=False)
    train, val = training_split(trees, TrainConfig(val_fraction=0.25), np.random.default_rng(0))
    assert not (train & val).any() and (train | val).all()
    assert sorted(report["val_trees"]) == np.unique(trees[val]).tolist() and len(report["val_trees"]) == 10
    assert not np.isin(trees[train], report["val_trees"]).any()
    cfg = TrainConfig(val_fraction=0.25, finetune_from="x", finetune_fraction=0.5)
    train, val = training_split(trees, cfg, np.random.default_rng(0))
    assert not (train & val).any() and len(np.unique(trees[train | val])) == 20
    assert len(np.unique(trees[val])) == 5
    with pytest.raises(ValueError, match="select_by"):
        train_classifier(data, str(tmp_path / "bad"), TrainConfig(select_by="loss"), progress=False)
    assert not os.path.exists(tmp_path / "bad")


def test_ranking_benchmark_reports_held_out_trees(tmp_path):
    """benchmarks/classifier_ranking.py evaluates only trees outside every listed classifier's training
    split and writes its table, JSON and plot."""
    import subprocess
    import sys

    data, clf = str(tmp_path / "data"), str(tmp_path / "clf")
    _synthetic(data, trees=40)
    report = train_classifier(data, clf, TrainConfig(epochs=2, val_fraction=0.25), progress=False)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "rank"
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "classifier_ranking.py"), "--trees", data,
                    "--out", str(out), "--holdout-of", clf, f"mine={clf}"], check=True, capture_output=True)
    result = json.loads((out / "ranking.json").read_text())
    assert result["held_out_trees"] == len(report["val_trees"]) == 10 and result["nodes"] == 10 * 200
    assert list(result["classifiers"]) == ["joint probability P (no classifier)", "mine"]
    mine = result["classifiers"]["mine"]
    assert mine["average_precision"] > 0.95  # the rule is learnable: the top 5% of nodes are nearly all accepted
    assert mine["recall_top0.05"] == pytest.approx(0.05 * result["nodes"] / result["accepted"], rel=0.05)
    assert (out / "ranking.png").stat().st_size > 0 and "| mine |" in (out / "ranking.md").read_text()


def test_depth_matched_negatives_follow_the_positives_depths():
    from c2t_fast.training.classifier import sample_negatives

    rng = np.random.default_rng(0)
    neg_depth = np.repeat(np.arange(10), [10] + [110] * 9)  # like a full tree: few shallow nodes
    neg_idx = np.arange(len(neg_depth)) + 1000
    pos_depth = np.array([0] * 8 + [1] * 2)
    for _ in range(5):
        picked = sample_negatives(neg_idx, neg_depth, pos_depth, 20, "depth_matched", rng)
        assert len(picked) == 20 and len(np.unique(picked)) == 20 and np.isin(picked, neg_idx).all()
        d = neg_depth[picked - 1000]
        assert (d == 0).sum() >= 8 and (d == 1).sum() >= 2  # half matched: as the positives, 8:2
        uniform = neg_depth[sample_negatives(neg_idx, neg_depth, pos_depth, 20, "uniform", rng) - 1000]
        assert (uniform == 0).sum() <= 3
    with pytest.raises(ValueError, match="neg_sampling"):
        sample_negatives(neg_idx, neg_depth, pos_depth, 20, "sideways", rng)
