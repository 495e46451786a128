import random

import numpy as np
import pytest

from lmmlab import data


def test_splits_are_deterministic_and_seeded():
    a = data.split("validation", 40)
    assert a == data.split("validation", 40)
    assert a != data.split("validation", 40, seed=1)


def test_splits_are_disjoint_by_scene():
    scenes = {name: {frozenset(s.scene) for s in data.split(name, 400)} for name in ("calibration", "validation", "test")}
    scenes["train"] = {frozenset(s.scene) for s in data.samples("train", 5000)}
    names = list(scenes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not scenes[a] & scenes[b], (a, b)
        assert all(data.scene_bucket(tuple(sc)) in data.SPLITS[a] for sc in scenes[a])


def test_kinds_are_balanced_and_answers_follow_from_the_scene():
    samples = data.split("test", 400)
    assert {k: sum(s.kind == k for s in samples) for k in data.KINDS} == {k: 100 for k in data.KINDS}
    for s in samples:
        shapes = {x.shape: x for x in s.scene}
        words = s.question.split()
        assert len(shapes) == len(s.scene) and 1 <= len(s.scene) <= data.MAX_SHAPES
        if s.kind == "count":
            assert s.answer == str(len(s.scene))
        elif s.kind == "colour":
            assert s.answer == shapes[words[4]].colour
        elif s.kind == "exists":
            assert s.answer == ("yes" if words[3] in shapes else "no")
        else:
            x = shapes[words[2]]
            expected = {"left": x.col == 0, "right": x.col == 2, "top": x.row == 0, "bottom": x.row == 2}
            assert expected[s.answer]


def test_every_answer_kind_is_represented():
    answers = {k: {s.answer for s in data.split("test") if s.kind == k} for k in data.KINDS}
    assert answers["count"] == {"1", "2", "3", "4"}
    assert answers["exists"] == {"yes", "no"}
    assert answers["position"] == {"left", "right", "top", "bottom"}
    assert answers["colour"] == set(data.COLOURS)


def test_image_shows_each_shape_in_its_cell(tmp_path):
    s = data.split("test", 1)[0]
    img = s.image()
    assert img.size == (data.IMAGE_SIZE, data.IMAGE_SIZE)
    pixels = np.asarray(img)
    for shape in s.scene:
        cell = pixels[shape.row * data.CELL:(shape.row + 1) * data.CELL, shape.col * data.CELL:(shape.col + 1) * data.CELL]
        centre = cell[data.CELL // 2, data.CELL // 2]
        assert tuple(centre) == data.COLOURS[shape.colour]
    empty = {(r, c) for r in range(data.GRID) for c in range(data.GRID)} - {(x.row, x.col) for x in s.scene}
    for r, c in empty:
        assert (pixels[r * data.CELL:(r + 1) * data.CELL, c * data.CELL:(c + 1) * data.CELL] == data.BACKGROUND).all()
    img.save(tmp_path / "sample.png")
    assert (tmp_path / "sample.png").stat().st_size > 0
    assert s.question in str(s) and s.answer in str(s)


def test_shapes_differ_in_pixels():
    rendered = {
        name: np.asarray(data.render([data.Shape(name, "red", "large", 1, 1)])).tobytes() for name in data.SHAPES
    }
    assert len(set(rendered.values())) == len(data.SHAPES)
    small = np.asarray(data.render([data.Shape("circle", "red", "small", 1, 1)]))
    large = np.asarray(data.render([data.Shape("circle", "red", "large", 1, 1)]))
    assert (small != data.BACKGROUND).any(-1).sum() < (large != data.BACKGROUND).any(-1).sum()


def test_bad_split_and_kind_fail_clearly():
    with pytest.raises(ValueError, match="unknown split 'tset'.*allowed: train"):
        data.split("tset", 3)
    with pytest.raises(ValueError, match="unknown question kind"):
        data.ask(data.random_scene(random.Random(0)), "size", random.Random(0))
    with pytest.raises(ValueError, match="endless"):
        data.split("train")


def test_vocabulary_covers_every_prompt_and_answer():
    vocab = set(data.vocabulary()) | {"<image>"}
    for s in data.split("validation"):
        assert set(s.prompt.split()) <= vocab and s.answer in vocab
