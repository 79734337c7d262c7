"""Detection file formats: DOTA-style text and the shared JSON schema."""

from __future__ import annotations

import json

import pytest

from galr.preprocess.detections import (
    Detection,
    DetectionFormatError,
    DetectionSet,
    find_detection_file,
    normalize_label,
    read_detections,
    write_detections_json,
)

DOTA_TEXT = """imagesource:GoogleEarth
gsd:0.146343590398

10 20 50 20 50 60 10 60 plane 0
# a comment line
100.5 100 140 110 130 150 90 140 storage-tank 1 0.75
5 5 15 5 15 9 5 9 small-vehicle
"""


@pytest.mark.parametrize(
    "raw, expected",
    [("storage tank", "storage-tank"), ("Storage_Tank", "storage-tank"), (" Large  Vehicle ", "large-vehicle"),
     ("ground-track-field", "ground-track-field"), ("Soccer_ball field", "soccer-ball-field")],
)
def test_normalize_label(raw, expected):
    assert normalize_label(raw) == expected


def test_dota_text_headers_scores_and_bounds(tmp_path):
    path = tmp_path / "boat_0.txt"
    path.write_text(DOTA_TEXT, encoding="utf-8")
    result = read_detections(path)
    assert result.source == str(path) and result.width is None and result.image is None
    assert [d.label for d in result.detections] == ["plane", "storage-tank", "small-vehicle"]
    assert [d.score for d in result.detections] == [1.0, 0.75, 1.0]  # ground truth has no score
    assert result.detections[1].box == (90.0, 100.0, 140.0, 150.0)  # bounds of the oriented polygon
    assert result.detections[0].polygon == ((10.0, 20.0), (50.0, 20.0), (50.0, 60.0), (10.0, 60.0))


@pytest.mark.parametrize(
    "line, message",
    [("1 2 3 4 5 6 7 8", "got 8 fields"), ("1 2 3 4 5 6 7 x plane 0", "could not convert"),
     ("1 2 3 4 5 6 7 8 plane 0 1.5", r"score must be in \[0, 1\]"), ("1 2 3 4 5 6 7 nan plane", "finite")],
)
def test_dota_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.txt"
    path.write_text(f"gsd:0.1\n1 1 2 1 2 2 1 2 ship 0\n{line}\n", encoding="utf-8")
    with pytest.raises(DetectionFormatError, match=message) as error:
        read_detections(path)
    assert f"{path}:3:" in str(error.value)


def test_json_schema_box_and_polygon_entries(tmp_path):
    document = {
        "image": "scene_00001.png", "width": 256, "height": 200,
        "detections": [
            {"label": "plane", "score": 0.93, "box": [10, 20, 30, 40]},
            {"label": "Storage Tank", "polygon": [[5, 5], [9, 4], [10, 8], [6, 9]], "difficult": 0},
        ],
    }
    path = tmp_path / "scene_00001.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    result = read_detections(path)
    assert (result.image, result.width, result.height) == ("scene_00001.png", 256, 200)
    assert result.name == "scene_00001.png"
    plane, tank = result.detections
    assert plane == Detection("plane", 0.93, (10.0, 20.0, 30.0, 40.0))
    assert tank.box == (5.0, 4.0, 10.0, 9.0) and tank.score == 1.0 and tank.label == "Storage Tank"


def test_json_bare_list_is_accepted(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"label": "ship", "score": 0.5, "box": [0, 0, 1, 1]}]), encoding="utf-8")
    result = read_detections(path)
    assert len(result) == 1 and result.width is None and result.image is None


def test_json_write_read_round_trip(tmp_path):
    original = DetectionSet(
        (Detection("plane", 0.5, (1, 2, 3, 4)), Detection.from_polygon("ship", 0.25, [(0, 0), (4, 0), (4, 2), (0, 2)])),
        width=64, height=32, source="memory", image="a.tif",
    )
    path = write_detections_json(tmp_path / "a.json", original)
    again = read_detections(path)
    assert again.detections == original.detections
    assert (again.width, again.height, again.image) == (64, 32, "a.tif")
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    assert set(on_disk) == {"image", "width", "height", "detections"}
    assert on_disk["detections"][0] == {"label": "plane", "score": 0.5, "box": [1.0, 2.0, 3.0, 4.0]}


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"detections": [\n  {"label": "a", "box": [0, 0, 1, 1]},\n  oops]}', r":3: not valid JSON"),
        ('{"detections": [{"box": [0, 0, 1, 1]}]}', r"detections\[0\]: missing 'label'"),
        ('{"detections": [{"label": "a", "score": 0.5}]}', r"detections\[0\]: needs 'box'"),
        ('{"detections": [{"label": "a", "box": [0, 0, 1, 1]}, {"label": "b", "score": "high", "box": [0, 0, 1, 1]}]}',
         r"detections\[1\]: could not convert"),
        ('{"detections": [{"label": "b", "box": [5, 0, 1, 1]}]}', r"detections\[0\]: .*x_max < x_min"),
        ('{"width": -3, "detections": []}', "width must be a positive integer"),
        ('{"image": "x.png"}', "expected a 'detections' list"),
        ('"just a string"', "expected an object"),
    ],
)
def test_json_errors_name_file_and_entry(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DetectionFormatError, match=message) as error:
        read_detections(path)
    assert str(path) in str(error.value)


def test_unknown_suffix_and_missing_file(tmp_path):
    path = tmp_path / "dets.xml"
    path.write_text("<x/>", encoding="utf-8")
    with pytest.raises(DetectionFormatError, match="DOTA-style .txt, a .json or a .csv"):
        read_detections(path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_detections(tmp_path / "nope.json")


def test_detection_validation():
    with pytest.raises(ValueError, match="score must be in"):
        Detection("plane", 1.2, (0, 0, 1, 1))
    with pytest.raises(ValueError, match="x_max < x_min"):
        Detection("plane", 0.5, (3, 0, 1, 1))
    with pytest.raises(ValueError, match="non-empty"):
        Detection(" ", 0.5, (0, 0, 1, 1))
    with pytest.raises(ValueError, match="4 .x, y. points"):
        Detection.from_polygon("plane", 0.5, [(0, 0), (1, 1), (2, 2)])


def test_find_detection_file_prefers_json(tmp_path):
    (tmp_path / "boat_0.txt").write_text("", encoding="utf-8")
    assert find_detection_file(tmp_path, "images/boat_0.tif") == tmp_path / "boat_0.txt"
    (tmp_path / "boat_0.json").write_text("[]", encoding="utf-8")
    assert find_detection_file(tmp_path, "boat_0.tif") == tmp_path / "boat_0.json"
    assert find_detection_file(tmp_path, "boat_1.tif") is None
    with pytest.raises(NotADirectoryError, match="missing"):
        find_detection_file(tmp_path / "missing", "boat_0.tif")


def test_csv_detections_with_boxes_or_corners_and_clear_errors(tmp_path):
    from galr.preprocess.detections import DetectionFormatError, find_detection_file, read_detections

    corners = tmp_path / "a.csv"
    corners.write_text("label,score,x1,y1,x2,y2,x3,y3,x4,y4,extra\nplane,0.91,10,12,40,12,40,30,10,30,x\n"
                       "ship,,1,1,3,1,3,2,1,2,\n")
    found = read_detections(corners)
    assert [d.label for d in found.detections] == ["plane", "ship"]
    assert found.detections[0].box == (10, 12, 40, 30) and found.detections[0].polygon[2] == (40, 30)
    assert found.detections[1].score == 1.0
    boxes = tmp_path / "b.csv"
    boxes.write_text("Label, x_min, y_min, x_max, y_max\ntank,5,6,7,8\n")
    assert read_detections(boxes).detections[0].box == (5, 6, 7, 8)
    assert find_detection_file(tmp_path, "images/b.png") == boxes
    bad = tmp_path / "c.csv"
    bad.write_text("label,x,y\nplane,1,2\n")
    with pytest.raises(DetectionFormatError, match="header must name"):
        read_detections(bad)
    broken = tmp_path / "d.csv"
    broken.write_text("label,x_min,y_min,x_max,y_max\nplane,1,2,oops,4\n")
    with pytest.raises(DetectionFormatError, match="d.csv:2"):
        read_detections(broken)
