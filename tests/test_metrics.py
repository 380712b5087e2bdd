"""Metric functions against hand-computed cases and scikit-learn; tables and pictures."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from pipeline import metrics
from pipeline.evaluate import plots, report

LABELS = ["none", "/per/org/member_of", "/loc/loc/contain"]
#        idx:   0  1  2  3  4  5
GOLD = np.array([0, 1, 1, 2, 0, 2])
PRED = np.array([1, 1, 0, 2, 0, 1])
KINDS = np.array([0, 0, 1, 1, 2, 2])


def test_micro_and_accuracy_by_hand():
    # correct non-none: idx 1, 3 -> 2; positive predictions: idx 0, 1, 3, 5 -> 4; gold non-none: 4.
    assert metrics.micro_prf(GOLD, PRED) == pytest.approx((0.5, 0.5, 0.5))
    result = metrics.score(GOLD, PRED, KINDS, LABELS)
    assert result["micro_precision"] == pytest.approx(0.5)
    assert result["micro_recall"] == pytest.approx(0.5)
    assert result["micro_f1"] == pytest.approx(0.5)
    assert result["accuracy"] == pytest.approx(3 / 6)  # idx 1, 3, 4 (none == none counts here)


def test_per_relation_and_macro_by_hand():
    rows = metrics.per_relation(GOLD, PRED, LABELS)
    assert [r["label"] for r in rows] == LABELS[1:]  # none excluded
    member, contain = rows
    # member_of: predicted at 0, 1, 5 (one hit), gold at 1, 2.
    member_prs = (member["precision"], member["recall"], member["support"])
    assert member_prs == pytest.approx((1 / 3, 0.5, 2))
    assert member["f1"] == pytest.approx(0.4)
    # contain: predicted at 3 (hit), gold at 3, 5.
    contain_prf = (contain["precision"], contain["recall"], contain["f1"])
    assert contain_prf == pytest.approx((1, 0.5, 2 / 3))
    result = metrics.score(GOLD, PRED, KINDS, LABELS)
    assert result["macro_f1"] == pytest.approx((0.4 + 2 / 3) / 2)


def test_by_pair_kind_by_hand():
    by_kind = metrics.score(GOLD, PRED, KINDS, LABELS)["by_pair_kind"]
    assert list(by_kind) == ["text-text", "text-object", "object-object"]
    # text-text: gold [0, 1], pred [1, 1] -> P 1/2, R 1 -> F 2/3.
    assert by_kind["text-text"] == {"micro_f1": pytest.approx(2 / 3), "support": 2}
    # text-object: gold [1, 2], pred [0, 2] -> P 1, R 1/2 -> F 2/3.
    assert by_kind["text-object"] == {"micro_f1": pytest.approx(2 / 3), "support": 2}
    # object-object: gold [0, 2], pred [0, 1] -> nothing correct.
    assert by_kind["object-object"] == {"micro_f1": 0.0, "support": 2}


def test_degenerate_cases_have_no_division_errors():
    gold = np.array([1, 2, 0])
    all_none = np.zeros(3, dtype=int)
    assert metrics.micro_prf(gold, all_none) == (0.0, 0.0, 0.0)
    result = metrics.score(gold, all_none, np.zeros(3, dtype=int), LABELS)
    assert result["accuracy"] == pytest.approx(1 / 3)
    # An absent pair kind has no score (MNRE: only text-text), not a real 0 for metrics diff.
    assert result["by_pair_kind"]["object-object"] == {"micro_f1": None, "support": 0}
    assert metrics.score([0, 0], [0, 0], [0, 0], LABELS)["macro_f1"] is None
    # Only none in gold: nothing to recall; a spurious positive gives precision 0.
    assert metrics.micro_prf([0, 0], [0, 2]) == (0.0, 0.0, 0.0)
    perfect = metrics.score([0, 1, 2], [0, 1, 2], [0, 1, 2], LABELS)
    assert perfect["micro_f1"] == perfect["macro_f1"] == perfect["accuracy"] == 1.0
    # A relation only predicted (never gold) still enters the macro average, with F1 0.
    only_pred = metrics.score([1, 1], [1, 2], [0, 0], LABELS)
    assert only_pred["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)
    with pytest.raises(ValueError, match="differ in length"):
        metrics.score([1, 2], [1], [0, 0], LABELS)
    for gold_ids, pred_ids in (([1, 2], [1]), ([1], [1, 2])):  # never broadcast
        with pytest.raises(ValueError, match="differ in length"):
            metrics.micro_prf(gold_ids, pred_ids)
    for outside in (5, len(LABELS), -1):
        with pytest.raises(ValueError, match="outside the label map"):
            metrics.per_relation([outside], [0], LABELS)


def test_macro_f1_averages_only_the_relations_that_occur():
    # Five labels, but only member_of occurs (gold at 0, 1; predicted at 0, hit): P 1, R 1/2.
    labels = [*LABELS, "/per/per/self", "/org/org/self"]
    result = metrics.score([1, 1, 0], [1, 0, 0], [0, 0, 0], labels)
    assert result["macro_f1"] == pytest.approx(2 / 3)  # not 2/3 spread over four relations
    assert result["micro_f1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scikit_learn(seed):
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    num_labels = 9
    labels = ["none"] + [f"/r/{i}" for i in range(1, num_labels)]
    # none-heavy gold like real data; label 8 never appears in gold, only sometimes predicted.
    gold = np.where(rng.random(400) < 0.4, 0, rng.integers(1, num_labels - 1, 400))
    pred = np.where(rng.random(400) < 0.6, gold, rng.integers(0, num_labels, 400))
    kinds = rng.integers(0, 3, 400)
    non_none = list(range(1, num_labels))
    p, r, f, _ = precision_recall_fscore_support(
        gold, pred, labels=non_none, average="micro", zero_division=0
    )
    result = metrics.score(gold, pred, kinds, labels)
    assert (result["micro_precision"], result["micro_recall"], result["micro_f1"]) == pytest.approx(
        (p, r, f)
    )
    assert result["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    seen = sorted((set(gold) | set(pred)) - {0})
    _, _, macro, _ = precision_recall_fscore_support(
        gold, pred, labels=seen, average="macro", zero_division=0
    )
    assert result["macro_f1"] == pytest.approx(macro)
    ps, rs, fs, support = precision_recall_fscore_support(
        gold, pred, labels=seen, average=None, zero_division=0
    )
    rows = metrics.per_relation(gold, pred, labels)
    assert [row["label"] for row in rows] == [labels[i] for i in seen]
    assert [row["precision"] for row in rows] == pytest.approx(ps)
    assert [row["recall"] for row in rows] == pytest.approx(rs)
    assert [row["f1"] for row in rows] == pytest.approx(fs)
    assert [row["support"] for row in rows] == support.tolist()
    for index, kind in enumerate(("text-text", "text-object", "object-object")):
        mask = kinds == index
        _, _, f_kind, _ = precision_recall_fscore_support(
            gold[mask], pred[mask], labels=non_none, average="micro", zero_division=0
        )
        assert result["by_pair_kind"][kind]["micro_f1"] == pytest.approx(f_kind)
        assert result["by_pair_kind"][kind]["support"] == int(mask.sum())


def test_confusion_matrix_and_records():
    from sklearn.metrics import confusion_matrix

    matrix = metrics.confusion_matrix(GOLD, PRED, len(LABELS))
    np.testing.assert_array_equal(matrix, confusion_matrix(GOLD, PRED, labels=[0, 1, 2]))
    assert matrix[2, 1] == 1  # gold contain (idx 5) predicted as member_of
    records = metrics.confusion_records(GOLD, PRED, LABELS)
    assert records[0] == {"actual": "none", "predicted": "/per/org/member_of"}
    assert records[2] == {"actual": "/per/org/member_of", "predicted": "none"}
    assert len(records) == len(GOLD)


def test_written_tables_and_pictures(tmp_path):
    rows = metrics.per_relation(GOLD, PRED, LABELS)
    report.write_per_relation_csv(tmp_path / "per_relation.csv", rows)
    with (tmp_path / "per_relation.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["label", "precision", "recall", "f1", "support"]
    assert table[0] == {
        "label": "/per/org/member_of",
        "precision": "0.3333",
        "recall": "0.5000",
        "f1": "0.4000",
        "support": "2",
    }
    report.write_confusion_json(
        tmp_path / "confusion.json", metrics.confusion_records(GOLD, PRED, LABELS)
    )
    data = json.loads((tmp_path / "confusion.json").read_text())
    assert len(data["confusion"]) == 6 and data["confusion"][3]["actual"] == "/loc/loc/contain"

    plots.plot_confusion(tmp_path / "plots" / "confusion.png", GOLD, PRED, LABELS)
    with Image.open(tmp_path / "plots" / "confusion.png") as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_training_plot_reads_dvclive_logs(tmp_path):
    from dvclive import Live

    live_dir = tmp_path / "dvclive"
    with Live(str(live_dir), dvcyaml=False, save_dvc_exp=False) as live:
        for epoch in (1, 2, 3):
            for step in range(1, 5):
                live.step = (epoch - 1) * 4 + step
                live.log_metric("train/loss", 2.0 / (live.step + 1))
            live.log_metric("epoch", epoch)
            live.log_metric("train/epoch_loss", 1.0 / epoch)
            live.log_metric("dev/micro_f1", 0.2 * epoch)
    steps, losses = plots.read_live_metric(live_dir, "train/loss")
    assert steps.tolist() == list(range(1, 13))
    assert losses[0] == pytest.approx(1.0)
    epoch_steps, f1 = plots.read_live_metric(live_dir, "dev/micro_f1")
    assert epoch_steps.tolist() == [4, 8, 12] and f1 == pytest.approx([0.2, 0.4, 0.6])

    plots.plot_training(live_dir, tmp_path / "training.png")
    with Image.open(tmp_path / "training.png") as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 100
    with pytest.raises(FileNotFoundError, match="dev/nothing"):
        plots.read_live_metric(live_dir, "dev/nothing")


def test_cell_labels_contrast_with_their_cell():
    plt = plots._pyplot()
    # viridis runs from dark purple (0) to light yellow (1); Blues from near-white to dark blue.
    assert plots._label_color(plt, "viridis", 1.0) == "black"
    assert plots._label_color(plt, "viridis", 0.0) == "white"
    assert plots._label_color(plt, "Blues", 0.0) == "black"
    assert plots._label_color(plt, "Blues", 1.0) == "white"
    assert plots._label_color(plt, "magma", float("nan")) == "black"  # blank cell
    assert plots._label_color(plt, "cividis", 7.0) == plots._label_color(plt, "cividis", 1.0)


def test_ot_regime_plot_labels_every_cell_readably(tmp_path, monkeypatch):
    plt = plots._pyplot()
    regime = {
        "mode": "transport",
        "threshold_cost": 22.1,
        "text": {
            "layer_01": {"share_above_floor": 1.0, "median_cost": 11.0, "relative_update": 0.02},
            "layer_02": {"share_above_floor": 0.25, "median_cost": 9.0, "relative_update": 0.03},
        },
        "vision": {
            "layer_01": {"share_above_floor": 0.0, "median_cost": 13.0, "relative_update": 0.06},
            "layer_02": {"share_above_floor": 1.0, "median_cost": 10.0},
        },
    }
    figures = []
    monkeypatch.setattr(plots, "_save_figure", lambda fig, path: figures.append(fig))
    plots.plot_ot_regime(tmp_path / "ot_regime.png", regime)
    (fig,) = figures
    labels = {
        ax.get_title(): {text.get_text(): text.get_color() for text in ax.texts} for ax in fig.axes
    }
    share = labels["share of kernel entries above the floor"]
    assert share == {"1": "black", "0.25": "white", "0": "white"}  # viridis: yellow 1, purple 0
    cost = labels["median cost"]
    assert (
        cost["13"] == "black" and cost["9"] == "white"
    )  # magma over 9..13: light top, black bottom
    update = labels["relative OT update ||w Pi S|| / ||h||"]
    assert update["nan"] == "black"  # the missing value: a blank cell
    assert len(fig.axes) == 3 and "22.10" in fig._suptitle.get_text()
    plt.close(fig)
    plots.plot_ot_regime(tmp_path / "none.png", {"mode": "transport"})
    assert "no OT" in figures[-1].axes[0].texts[0].get_text()


def test_selected_on_test_keeps_the_later_of_equal_epochs(tmp_path):
    # The original picked on test with `>=`: among equal maxima, the last epoch.
    metrics_dir = tmp_path / "plots" / "metrics"
    (metrics_dir / "test").mkdir(parents=True)
    rows = [(38, 1, 0.5), (76, 2, 0.75), (114, 3, 0.625), (152, 4, 0.75), (190, 5, 0.25)]
    (metrics_dir / "test" / "micro_f1.tsv").write_text(
        "step\tmicro_f1\n" + "".join(f"{s}\t{f}\n" for s, _, f in rows)
    )
    (metrics_dir / "epoch.tsv").write_text(
        "step\tepoch\n" + "".join(f"{s}\t{e}\n" for s, e, _ in rows)
    )
    assert report.selected_on_test(tmp_path) == {"micro_f1": 0.75, "epoch": 4}


class _TestSplit:
    """What evaluate_model reads of a feature split: its name, size and sample ids."""

    split = "test"

    def __init__(self, sample_ids: list[str]):
        self.sample_ids = sample_ids

    def __len__(self) -> int:
        return len(self.sample_ids)


def _stub_evaluation(monkeypatch, gold, pred, kinds, *, ot_floor: float = 1e-12) -> dict:
    """evaluate_model's model, feature split and predictions replaced by fixed label ids (the
    probabilities put 0.7 on ``pred``), so that its files can be checked against literals."""
    from types import SimpleNamespace

    import torch

    from pipeline.config import default_params

    params = default_params({"model.ot.kernel_floor": ot_floor})
    trained = SimpleNamespace(model=torch.nn.Linear(1, 1), params=params, labels=LABELS)
    split = _TestSplit([f"s{i}" for i in range(len(gold))])
    probs = np.full((len(gold), len(LABELS)), 0.3 / (len(LABELS) - 1), dtype=np.float32)
    probs[np.arange(len(gold)), pred] = 0.7
    out = {
        "index": np.arange(len(gold)),
        "gold": np.asarray(gold),
        "pred": np.asarray(pred),
        "pair_kind": np.asarray(kinds),
        "probs": probs,
    }
    seen = {}
    monkeypatch.setattr(report, "load_for_inference", lambda model_dir: trained)
    monkeypatch.setattr(report.FeatureDataset, "load", staticmethod(lambda *a, **k: split))
    monkeypatch.setattr(report, "predict_dataset", lambda *a, **k: out)
    monkeypatch.setattr(
        report, "plot_confusion", lambda path, g, p, labels: seen.update(gold=g, pred=p)
    )
    return seen


def test_evaluate_writes_each_sample_and_relation_as_computed_by_hand(tmp_path, monkeypatch):
    seen = _stub_evaluation(monkeypatch, GOLD, PRED, KINDS)
    result = report.evaluate_model("m", "f", tmp_path / "metrics", tmp_path / "plots", None, 8)

    lines = (tmp_path / "metrics" / "predictions.jsonl").read_text().splitlines()
    kind_names = ["text-text", "text-text", "text-object", "text-object"]
    kind_names += ["object-object", "object-object"]
    expected = [
        {"id": f"s{i}", "pair_kind": kind_names[i], "gold": LABELS[g], "predicted": LABELS[p]}
        | {"confidence": 0.7}
        for i, (g, p) in enumerate(zip(GOLD, PRED, strict=True))
    ]
    assert [json.loads(line) for line in lines] == expected
    # One row per relation seen (none left out): precision = hits / predicted, recall = hits /
    # gold, support = gold count. member_of: predicted at 0, 1, 5, gold at 1, 2, hit at 1;
    # contain: predicted at 3, gold at 3, 5, hit at 3.
    assert (tmp_path / "metrics" / "per_relation.csv").read_text().splitlines() == [
        "label,precision,recall,f1,support",
        "/per/org/member_of,0.3333,0.5000,0.4000,2",
        "/loc/loc/contain,1.0000,0.5000,0.6667,2",
    ]
    written = json.loads((tmp_path / "metrics" / "test.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["by_pair_kind"] == {
        "text-text": {"micro_f1": pytest.approx(2 / 3), "support": 2},
        "text-object": {"micro_f1": pytest.approx(2 / 3), "support": 2},
        "object-object": {"micro_f1": 0.0, "support": 2},
    }
    confusion = json.loads((tmp_path / "plots" / "confusion.json").read_text())["confusion"]
    assert confusion == [{"actual": e["gold"], "predicted": e["predicted"]} for e in expected]
    # The picture is drawn from the same pairs, gold as the rows.
    assert seen["gold"].tolist() == GOLD.tolist() and seen["pred"].tolist() == PRED.tolist()


def test_evaluate_writes_precision_and_recall_each_in_its_place(tmp_path, monkeypatch):
    # gold non-none at 0, 1, 2; predicted non-none at 0 (a hit) and 3: P 1/2, R 1/3, F 2/5.
    gold, pred = np.array([1, 2, 1, 0]), np.array([1, 0, 0, 2])
    _stub_evaluation(monkeypatch, gold, pred, np.zeros(4, dtype=np.int64))
    report.evaluate_model("m", "f", tmp_path / "metrics", tmp_path / "plots", None, 8)
    written = json.loads((tmp_path / "metrics" / "test.json").read_text())
    assert (written["micro_precision"], written["micro_recall"]) == pytest.approx((1 / 2, 1 / 3))
    assert (written["micro_f1"], written["accuracy"]) == pytest.approx((2 / 5, 1 / 4))


def test_evaluate_refuses_an_empty_test_split(tmp_path, monkeypatch):
    empty = np.zeros(0, dtype=np.int64)
    _stub_evaluation(monkeypatch, empty, empty, empty)
    with pytest.raises(report.DataError, match="test: no samples to score"):
        report.evaluate_model("m", "f", tmp_path / "metrics", tmp_path / "plots", None, 8)
    assert not (tmp_path / "metrics").exists()


def test_ot_regime_without_a_floor_is_valid_json(tmp_path, monkeypatch):
    # Pure entropic OT (kernel_floor 0) loses no entry in a floor: no threshold, written as null
    # (an infinite number would make the file unreadable as JSON for dvc metrics).
    _stub_evaluation(monkeypatch, GOLD, PRED, KINDS, ot_floor=0.0)
    report.evaluate_model("m", "f", tmp_path / "metrics", tmp_path / "plots", None, 8)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    text = (tmp_path / "metrics" / "ot_regime.json").read_text()
    regime = json.loads(text, parse_constant=refuse)
    assert regime["enabled"] is True and regime["threshold_cost"] is None


def _captured_figures(monkeypatch) -> list:
    figures = []
    monkeypatch.setattr(plots, "_save_figure", lambda fig, path: figures.append(fig))
    return figures


def test_confusion_picture_puts_gold_on_rows_and_keeps_labels_never_predicted(monkeypatch):
    labels = [*LABELS, "/per/per/self"]
    # /per/per/self is gold once and never predicted: it still gets its row.
    gold = np.array([0, 1, 1, 2, 3, 3])
    pred = np.array([0, 1, 2, 2, 0, 1])
    figures = _captured_figures(monkeypatch)
    plots.plot_confusion("unused.png", gold, pred, labels)
    (fig,) = figures
    (ax,) = fig.axes
    rows = [tick.get_text() for tick in ax.get_yticklabels()]
    cols = [tick.get_text() for tick in ax.get_xticklabels()]
    assert rows == cols == labels
    assert (ax.get_ylabel(), ax.get_xlabel()) == ("actual", "predicted")
    cells = {
        (round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts
    }
    # (row = gold, column = predicted): count, counted by hand.
    assert cells == {(0, 0): "1", (1, 1): "1", (1, 2): "1", (2, 2): "1", (3, 0): "1", (3, 1): "1"}
    plots._pyplot().close(fig)
    # A label only predicted, never gold, gets its column (and row) too.
    plots.plot_confusion("unused.png", np.array([0, 1]), np.array([3, 1]), labels)
    (ax,) = figures[-1].axes
    names = [LABELS[0], LABELS[1], "/per/per/self"]
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    plots._pyplot().close(figures[-1])


def test_training_picture_marks_the_best_dev_epoch(tmp_path, monkeypatch):
    metrics_dir = tmp_path / "plots" / "metrics"
    (metrics_dir / "train").mkdir(parents=True)
    (metrics_dir / "dev").mkdir()
    epochs = [(4, 1, 0.5), (8, 2, 0.75), (12, 3, 0.25)]  # step, epoch, dev micro-F1
    (metrics_dir / "epoch.tsv").write_text(
        "step\tepoch\n" + "".join(f"{s}\t{e}\n" for s, e, _ in epochs)
    )
    (metrics_dir / "dev" / "micro_f1.tsv").write_text(
        "step\tmicro_f1\n" + "".join(f"{s}\t{f}\n" for s, _, f in epochs)
    )
    (metrics_dir / "train" / "epoch_loss.tsv").write_text(
        "step\tepoch_loss\n4\t1\n8\t0.5\n12\t0.4\n"
    )
    (metrics_dir / "train" / "loss.tsv").write_text(
        "step\tloss\n" + "".join(f"{s}\t{1 / s}\n" for s in range(1, 13))
    )
    figures = _captured_figures(monkeypatch)
    plots.plot_training(tmp_path, "unused.png")
    (fig,) = figures
    assert fig.axes[1].get_title() == "best dev micro-F1 0.7500 (epoch 2)"
    plots._pyplot().close(fig)
    # A later epoch that ties the best is the one training selects (the original's `>=`): the
    # picture marks that one too.
    (metrics_dir / "dev" / "micro_f1.tsv").write_text("step\tmicro_f1\n4\t0.75\n8\t0.5\n12\t0.75\n")
    plots.plot_training(tmp_path, "unused.png")
    fig = figures[-1]
    assert fig.axes[1].get_title() == "best dev micro-F1 0.7500 (epoch 3)"
    (circle,) = fig.axes[1].collections
    assert circle.get_offsets().tolist() == [[3.0, 0.75]]
    plots._pyplot().close(fig)


def test_ot_regime_report_states_the_settings_the_threshold_and_the_summary():
    import math

    import torch

    from pipeline.config import default_params
    from pipeline.model.regime import RegimeStats

    ot = default_params({"model.ot.epsilon": 0.25, "model.ot.kernel_floor": 1e-6}).model.ot
    stats = RegimeStats(0.25 * (math.log(1e6) + 24 * math.log(2)))  # 7.6128 by hand
    stats.add_cost(torch.tensor([[[2.0, 9.0], [5.0, 30.0]]]), None)  # 2 of 4 above the floor
    regime = report.ot_regime_report(ot, {"text": [stats], "vision": []})
    assert regime.keys() == {
        "enabled", "mode", "epsilon", "kernel_floor", "threshold_cost", "text", "all"
    }  # fmt: skip
    assert (regime["enabled"], regime["mode"]) == (True, "transport")
    assert (regime["epsilon"], regime["kernel_floor"]) == (0.25, 1e-6)
    assert regime["threshold_cost"] == pytest.approx(7.6128, abs=1e-4)
    assert regime["all"] == {"share_above_floor": 0.5, "min_cost": 2.0}
    assert regime["text"]["layer_01"]["share_above_floor"] == 0.5
    uniform = default_params({"model.ot.mode": "uniform"}).model.ot
    assert report.ot_regime_report(uniform, {"text": [], "vision": []})["mode"] == "uniform"
    off = default_params({"model.ot.enabled": False}).model.ot
    assert report.ot_regime_report(off, {"text": [], "vision": []}) == {"enabled": False}


def test_dataset_summary_gives_the_source_split_sizes_and_manifest_hash(tmp_path):
    import hashlib

    manifest = {
        "source": "umre",
        "splits": {"train": {"samples": 7, "sha256": "x"}, "test": {"samples": 3, "sha256": "y"}},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    digest = hashlib.sha256((tmp_path / "manifest.json").read_bytes()).hexdigest()
    assert report.dataset_summary(tmp_path) == {
        "source": "umre",
        "manifest_sha256": digest,
        "splits": {"train": 7, "test": 3},
    }


def test_selected_on_test_refuses_a_run_that_logged_no_test_score(tmp_path):
    metrics_dir = tmp_path / "plots" / "metrics"
    (metrics_dir / "test").mkdir(parents=True)
    (metrics_dir / "test" / "micro_f1.tsv").write_text("step\tmicro_f1\n")
    (metrics_dir / "epoch.tsv").write_text("step\tepoch\n")
    with pytest.raises(ValueError, match="no test/micro_f1 logged"):
        report.selected_on_test(tmp_path)


def test_publish_model_links_the_folders_files_and_writes_only_its_own_card(tmp_path):
    from types import SimpleNamespace

    from pipeline.config import default_params

    source, release = tmp_path / "selected", tmp_path / "best"
    (source / "tokenizer").mkdir(parents=True)
    (source / "model.safetensors").write_bytes(b"weights")
    (source / "tokenizer" / "vocab.txt").write_text("[PAD]\n")
    (source / "README.md").write_text("the dev card\n")
    trained = SimpleNamespace(params=default_params(), labels=LABELS, info={"epoch": 1})
    test = {"micro_f1": 0.5, "micro_precision": 0.25, "micro_recall": 1.0, "accuracy": 0.75}
    report.publish_model(source, release, trained, test | {"macro_f1": 0.5}, None)
    files = ["README.md", "model.safetensors", "tokenizer", "tokenizer/vocab.txt"]
    assert sorted(p.relative_to(release).as_posix() for p in release.rglob("*")) == files
    for name in ("model.safetensors", "tokenizer/vocab.txt"):  # hard links, not copies
        assert (release / name).stat().st_ino == (source / name).stat().st_ino, name
    # The new card replaces the link: the source folder keeps its own card.
    assert (source / "README.md").read_text() == "the dev card\n"
    card = (release / "README.md").read_text()
    assert "| micro precision | 0.2500 |" in card and "the dev card" not in card


def test_ot_regime_plot_of_a_uniform_model_has_the_update_panel_only(monkeypatch):
    regime = {
        "mode": "uniform",
        "threshold_cost": None,
        "text": {"layer_01": {"relative_update": 0.5}, "layer_02": {"relative_update": 0.25}},
        "vision": {"layer_01": {"relative_update": 0.125}, "layer_02": {"relative_update": 1.0}},
    }
    figures = _captured_figures(monkeypatch)
    plots.plot_ot_regime("unused.png", regime)
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_title() == "relative OT update ||w Pi S|| / ||h||"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["text", "vision"]
    cells = {
        (round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts
    }
    assert cells == {(0, 0): "0.5", (0, 1): "0.125", (1, 0): "0.25", (1, 1): "1"}
    assert fig._suptitle is None  # no floor, no threshold to state
    plots._pyplot().close(fig)


def test_evaluate_adds_the_test_selected_figure_only_when_the_run_reported_test(
    tmp_path, monkeypatch
):
    from types import SimpleNamespace

    import torch

    from pipeline.config import default_params

    _stub_evaluation(monkeypatch, GOLD, PRED, KINDS)
    monkeypatch.setattr(report, "plot_training", lambda live_dir, path: None)
    live = tmp_path / "live"
    (live / "plots" / "metrics" / "test").mkdir(parents=True)
    rows = [(4, 1, 0.5), (8, 2, 0.75), (12, 3, 0.25)]  # step, epoch, test micro-F1
    (live / "plots" / "metrics" / "test" / "micro_f1.tsv").write_text(
        "step\tmicro_f1\n" + "".join(f"{s}\t{f}\n" for s, _, f in rows)
    )
    (live / "plots" / "metrics" / "epoch.tsv").write_text(
        "step\tepoch\n" + "".join(f"{s}\t{e}\n" for s, e, _ in rows)
    )
    result = report.evaluate_model("m", "f", tmp_path / "a", tmp_path / "pa", live, 8)
    assert "selected_on_test" not in result  # train.report_test_each_epoch: false
    params = default_params({"train.report_test_each_epoch": True})
    trained = SimpleNamespace(model=torch.nn.Linear(1, 1), params=params, labels=LABELS)
    monkeypatch.setattr(report, "load_for_inference", lambda model_dir: trained)
    result = report.evaluate_model("m", "f", tmp_path / "b", tmp_path / "pb", live, 8)
    assert result["selected_on_test"] == {"micro_f1": 0.75, "epoch": 2}
    written = json.loads((tmp_path / "b" / "test.json").read_text())
    assert written["selected_on_test"] == {"micro_f1": 0.75, "epoch": 2}
