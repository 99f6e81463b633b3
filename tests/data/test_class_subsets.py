"""DataConfig.classes: a subset of the classes, relabelled 0..K'-1 in the order given, in every split and data set.

The kept classes' examples are exactly those they have in the full data set's splits; train_limit /
test_limit count within the subset; the field round-trips through RunConfig and `--set data.classes=[...]`.
"""

import json
import math
from pathlib import Path
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from mixflow_core import build_model
from mixflow_core.data import CLASS_NAMES, DEBIAN_FASHION_MNIST, DataConfig, Splits, load_data, resolve_classes
from mixflow_core.training.config import RunConfig, apply_overrides, resume_conflicts
from tests.data.test_data import write_cifar, write_fashion

PARTS = ("train", "val", "test")


def relabelled(full: Splits, part: str, kept: tuple[int, ...]) -> Counter:
    """Multiset of (x bytes, new label) of the full split's examples of the `kept` labels."""
    new = {k: i for i, k in enumerate(kept)}
    x, y = getattr(full, part).tensors
    return Counter((xi.numpy().tobytes(), new[int(yi)]) for xi, yi in zip(x, y) if int(yi) in new)


def examples(ds) -> Counter:
    return Counter((x.numpy().tobytes(), int(y)) for x, y in zip(*ds.tensors))


def assert_subset_of(full: Splits, sub: Splits, kept: tuple[int, ...]) -> None:
    """Every split of `sub` holds exactly the full split's examples of `kept`, relabelled, and their names."""
    assert sub.num_classes == len(kept) and sub.class_names == tuple(full.class_names[k] for k in kept)
    assert sub.data_shape == full.data_shape and sub.levels == full.levels
    for part in PARTS:
        assert examples(getattr(sub, part)) == relabelled(full, part, kept), part
        assert getattr(sub, part).tensors[1].dtype == torch.int64


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_data(DataConfig("digits"))


# -- digits ------------------------------------------------------------------------------------


def test_digits_two_classes(digits):
    sub = load_data(DataConfig("digits", classes=(4, 9)))
    assert sub.class_names == ("4", "9") and sub.num_classes == 2
    assert_subset_of(digits, sub, (4, 9))
    for part in PARTS:  # per-class counts equal the original ones, split by split
        full_y, sub_y = getattr(digits, part).tensors[1], getattr(sub, part).tensors[1]
        assert torch.bincount(sub_y, minlength=2).tolist() == [int((full_y == 4).sum()), int((full_y == 9).sum())]
    assert torch.equal(sub.class_counts(), torch.bincount(sub.train.tensors[1], minlength=2))


def test_digits_order_names_and_labels(digits):
    """The order given sets the labels, not the examples; names and labels may be mixed."""
    swapped = load_data(DataConfig("digits", classes=(9, 4)))
    assert swapped.class_names == ("9", "4")
    assert_subset_of(digits, swapped, (9, 4))
    by_name = load_data(DataConfig("digits", classes=("4", 9)))
    a = load_data(DataConfig("digits", classes=(4, 9)))
    for part in PARTS:
        for ta, tb in zip(getattr(a, part).tensors, getattr(by_name, part).tensors):
            assert torch.equal(ta, tb)
        assert torch.equal(getattr(swapped, part).tensors[1], 1 - getattr(a, part).tensors[1])


def test_all_classes_in_order_is_no_subset(digits):
    for cfg in (DataConfig("digits", classes=tuple(range(10))),):
        every = load_data(cfg)
        for part in PARTS:
            for ta, tb in zip(getattr(every, part).tensors, getattr(digits, part).tensors):
                assert torch.equal(ta, tb)
    limited = load_data(DataConfig("digits", train_limit=300, test_limit=100))
    limited_all = load_data(DataConfig("digits", train_limit=300, test_limit=100, classes=tuple(range(10))))
    for part in PARTS:
        for ta, tb in zip(getattr(limited, part).tensors, getattr(limited_all, part).tensors):
            assert torch.equal(ta, tb)


def test_limits_count_within_the_subset(digits):
    """train + val hold train_limit examples of the kept classes, test test_limit; still stratified."""
    sub = load_data(DataConfig("digits", classes=(4, 9), train_limit=100, test_limit=30))
    assert len(sub.train) + len(sub.val) == 100 and len(sub.val) == math.ceil(0.1 * 100) and len(sub.test) == 30
    full = load_data(DataConfig("digits", classes=(4, 9)))
    assert not examples(sub.train) + examples(sub.val) - (examples(full.train) + examples(full.val))
    assert not examples(sub.test) - examples(full.test)
    pool = torch.cat([sub.train.tensors[1], sub.val.tensors[1]])
    assert abs(int((pool == 0).sum()) - 50) <= 1 and abs(int((sub.test.tensors[1] == 0).sum()) - 15) <= 1
    # a limit larger than the subset keeps all of it
    assert_subset_of(digits, load_data(DataConfig("digits", classes=(4, 9), train_limit=1000)), (4, 9))


# -- every data set ------------------------------------------------------------------------------


def test_fashion_mnist_by_name(tmp_path):
    write_fashion(tmp_path, n_train=200, n_test=40)
    full = load_data(DataConfig("fashion-mnist", root=str(tmp_path)))
    sub = load_data(DataConfig("fashion-mnist", root=str(tmp_path), classes=("Shirt", "T-shirt/top")))
    assert sub.class_names == ("Shirt", "T-shirt/top")
    assert_subset_of(full, sub, (6, 0))
    folded = load_data(DataConfig("fashion-mnist", root=str(tmp_path), classes=("shirt", "t-shirt/TOP")))
    assert folded.class_names == ("Shirt", "T-shirt/top")  # matched case-insensitively, the data set's names kept
    assert torch.equal(folded.train.tensors[1], sub.train.tensors[1])
    # the official test set keeps its file order
    keep = np.isin(full.test.tensors[1].numpy(), [6, 0])
    assert torch.equal(sub.test.tensors[0], full.test.tensors[0][torch.from_numpy(keep)])


def test_cifar10_and_toy2d(tmp_path):
    write_cifar(tmp_path, n=40)
    full = load_data(DataConfig("cifar10", root=str(tmp_path)))
    sub = load_data(DataConfig("cifar10", root=str(tmp_path), classes=("cat", "dog", 0)))
    assert sub.class_names == ("cat", "dog", "airplane")
    assert_subset_of(full, sub, (3, 5, 0))
    moons = load_data(DataConfig("toy2d", toy_n=300))
    flipped = load_data(DataConfig("toy2d", toy_n=300, classes=("lower moon", "upper moon")))
    assert flipped.class_names == ("lower moon", "upper moon")
    assert_subset_of(moons, flipped, (1, 0))


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                    reason=f"{DEBIAN_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist)")
def test_debian_fashion_mnist_two_classes():
    """The official sets are balanced: 5400 / 600 / 1000 of each kept class, as in the full data set."""
    sub = load_data(DataConfig("fashion-mnist", classes=("Shirt", "T-shirt/top")))
    assert sub.class_names == ("Shirt", "T-shirt/top")
    for part, n in (("train", 5400), ("val", 600), ("test", 1000)):
        assert torch.bincount(getattr(sub, part).tensors[1], minlength=2).tolist() == [n, n]


@pytest.mark.parametrize("name", sorted(CLASS_NAMES))
def test_class_names_are_the_loaders_names(tmp_path, name):
    write_fashion(tmp_path)
    write_cifar(tmp_path)
    assert load_data(DataConfig(name, root=str(tmp_path), toy_n=200)).class_names == CLASS_NAMES[name]


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, classes, match", [
    ("fashion-mnist", ("Shirt", "Jumper"), r"unknown class 'Jumper'.*'T-shirt/top'.*'Ankle boot'"),
    ("digits", (4, 10), r"unknown label 10.*'0'.*'9'"),
    ("digits", (-1, 3), "unknown label -1"),
    ("digits", ("four", 9), "unknown class 'four'"),
    ("digits", (4, 4), "'4' chosen more than once"),
    ("digits", ("4", 4, 9), "'4' chosen more than once"),
    ("fashion-mnist", ("Shirt", "shirt"), "'Shirt' chosen more than once"),
    ("digits", (4,), "at least 2 classes"),
    ("digits", (), "at least 2 classes"),
    ("toy2d", ("upper moon",), "at least 2 classes"),
    ("digits", (True, 3), "neither a class name nor an integer label"),
    ("digits", (4.0, 3), "neither a class name nor an integer label"),
    ("digits", "49", "a list of class names or labels"),
])
def test_bad_classes_raise(name, classes, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(name, classes=classes)


def test_resolve_classes():
    assert resolve_classes(["Bag", 0, "sneaker"], CLASS_NAMES["fashion-mnist"]) == (8, 0, 7)
    assert DataConfig("digits", classes=[4, 9]).classes == (4, 9)  # a list becomes a tuple: hashable, comparable


# -- configs: to_dict / from_dict, --set, resume ----------------------------------------------------


def test_run_config_round_trip():
    cfg = RunConfig(data=DataConfig("fashion-mnist", classes=("Shirt", 0)))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["data"]["classes"] == ["Shirt", 0]
    assert RunConfig.from_dict(d) == cfg and RunConfig.from_dict(d).data.classes == ("Shirt", 0)
    assert RunConfig().to_dict()["data"]["classes"] is None
    old = RunConfig().to_dict()
    del old["data"]["classes"]  # a config.json written before the field existed
    assert RunConfig.from_dict(old) == RunConfig()


def test_set_overrides():
    from mixflow_core.training.runs import parse_set

    base = RunConfig()
    over = parse_set(['data.classes=["shirt","T-shirt/top"]', "data.name=fashion-mnist"])
    assert apply_overrides(base, over).data == DataConfig("fashion-mnist", classes=("shirt", "T-shirt/top"))
    assert apply_overrides(base, parse_set(["data.classes=[3,8]"])).data.classes == (3, 8)
    cfg = apply_overrides(base, {"data.classes": [3, 8]})
    assert apply_overrides(cfg, parse_set(["data.classes=null"])).data.classes is None
    with pytest.raises(ValueError, match="data.classes must be"):
        apply_overrides(base, parse_set(["data.classes=3,8"]))  # not JSON: a string, not a list
    with pytest.raises(ValueError, match="unknown class 'Shirt'"):
        apply_overrides(base, {"data.classes": ["Shirt", "Bag"]})  # digits has no shirts
    with pytest.raises(ValueError, match="at least 2 classes"):
        apply_overrides(base, {"data.classes": [3]})


def test_resume_refuses_a_change_of_classes():
    saved, new = RunConfig(), RunConfig(data=DataConfig(classes=(4, 9)))
    assert resume_conflicts(saved.to_dict(), new.to_dict()) == {"data.classes": (None, [4, 9])}


# -- end to end: a two-class model ----------------------------------------------------------------


def test_a_two_class_model_trains_and_evaluates():
    from mixflow_core.eval.metrics import evaluate
    from mixflow_core.training.fit import fit
    from mixflow_core.training.profiles import get_profile

    cfg = apply_overrides(get_profile("digits", "smoke"), {"data.classes": [4, 9], "runtime.epochs": 1})
    data = load_data(cfg.data)
    assert data.num_classes == 2 and data.class_names == ("4", "9")
    model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior, data.class_counts())
    history = fit(model, data, cfg.train, replace(cfg.runtime, epochs=1))
    assert len(history.epochs) == 1 and math.isfinite(history.epochs[0]["train_loss"])
    assert model.num_classes == 2 and model.prior.log_class_probs.shape == (2,)
    assert float(model.prior.log_class_probs.exp().sum()) == pytest.approx(1.0)
    m = evaluate(model, data.test)
    assert m["n"] == len(data.test) and len(m["confusion"]) == 2 and 0.0 <= m["accuracy"] <= 1.0


# -- the report and the CLI ------------------------------------------------------------------------


def test_classes_tag_names_directories_by_original_labels():
    from mixflow_core.data import classes_tag

    assert classes_tag("fashion-mnist", ["shirt", "T-shirt/top", "pullover"]) == "-classes-6-0-2"
    assert classes_tag("digits", None) == "" and classes_tag("digits", [9, "4"]) == "-classes-9-4"
    with pytest.raises(ValueError, match="unknown class"):
        classes_tag("digits", ["shirt", 3])


def test_report_plan_and_cli_carry_the_subset(tmp_path):
    from mixflow_core.cli import build_parser
    from mixflow_core.study import report

    steps = report.plan("fashion-mnist", "default", classes=["shirt", "T-shirt/top"], runs_dir=tmp_path)
    trains = [s for s in steps if s.notebook == report.TRAIN]
    assert all(s.parameters["overrides"]["data.classes"] == ["shirt", "T-shirt/top"] for s in trains)
    assert [Path(s.parameters["run_dir"]).name for s in trains] == [
        "fashion-mnist-default-classes-6-0-seed0-fixed", "fashion-mnist-default-classes-6-0-seed0-student",
        "fashion-mnist-default-classes-6-0-seed0-fixed-iresnet"]
    assert steps[-1].parameters["frontier_json"] == ""  # the committed frontier is of all ten classes too
    assert Path(steps[-1].parameters["figures_dir"]).name == "fashion-mnist-default-classes-6-0"
    assert steps[-1].parameters["ablation_json"] == ""  # the committed ablation is of all ten classes
    args = build_parser().parse_args(["report", "--dataset", "digits", "--classes", "4, 9"])
    assert args.classes == [4, 9]
    assert build_parser().parse_args(["report", "--classes", "shirt,T-shirt/top"]).classes == ["shirt", "T-shirt/top"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["report", "--classes", "4"])


def test_cli_train_names_the_run_by_its_classes(tmp_path, monkeypatch, capsys):
    from mixflow_core.cli import main

    monkeypatch.chdir(tmp_path)
    main(["train", "--dataset", "digits", "--profile", "smoke", "--set", "data.classes=[4,9]", "runtime.epochs=1"])
    run_dir = tmp_path / "runs" / "digits-smoke-classes-4-9-seed0"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["data"]["classes"] == [4, 9] and saved["dataset_info"]["class_names"] == ["4", "9"]
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["n"] == 72  # 36 fours + 36 nines


def test_a_two_class_report_runs_end_to_end(tmp_path):
    """The whole notebook sequence on digits 4 vs 9: every notebook sees two classes named "4" and "9"."""
    from mixflow_core.study import report

    steps = report.plan("digits", "smoke", classes=[4, 9], reports_dir=tmp_path / "reports",
                        runs_dir=tmp_path / "runs", figures_dir=tmp_path / "figures", ablation_json="",
                        baselines="fast", tsne=False)
    report.run_report(steps, echo=lambda _: None)
    out = json.loads(Path(steps[-1].parameters["results_json"]).read_text())
    assert {r["method"] for r in out["rows"]} >= {"mixture flow: fixed", "mixture flow: student"}
    assert all(sum(b["counts"]) == 72 for b in out["calibration"]["bins"].values())  # 72 test images of 4 and 9
    metrics = json.loads((Path(steps[0].parameters["run_dir"]) / "metrics.json").read_text())
    assert len(metrics["test"]["confusion"]) == 2 and metrics["test"]["n"] == 72
    overlap = json.loads(Path(steps[3].parameters["results_json"]).read_text())
    assert overlap["fixed"]["most_confused"][0][:2] in (["4", "9"], ["9", "4"])
    assert out["ood"]["rows"] and all(r["n_in"] == 72 for r in out["ood"]["rows"])
