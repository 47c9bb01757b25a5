"""Extraction of the model's JSON, the validators, and the personas they must agree with."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest
import yaml

from adapter.agents import TASKS, load_tasks
from adapter.extract import MAX_TEXT, REPAIR_MAX, NoJsonObject, extract_object, objects
from adapter.settings import ConfigError, Settings
from adapter.validation import OutputInvalid, classify, deal_result, email_result, lead_result

AGENTS_DIR = Path(Settings.from_env({}).conductor_agents_dir)
LEAD = {"score": 55, "classification": "Warm", "reasoning": " ".join(["word"] * 50),
        "next_actions": ["a", "b", "c"], "bant": {"budget": "x", "authority": "y", "need": "z", "timeline": "Unknown"}}


def text(obj: object) -> str:
    return msgspec.json.encode(obj).decode()


@pytest.mark.parametrize("wrapped", [
    '{"a": 1}',
    'Sure, here it is:\n```json\n{"a": 1}\n```\nAnything else?',
    '```\n{"a": 1}\n```',
    'My answer: {"a": 1} -- hope it helps',
    '{"a": 1,}',
    '```json\n{"a": [1, 2,],}\n```',
])
def test_extracts_wrapped_objects(wrapped):
    assert extract_object(wrapped)["a"] in (1, [1, 2])


def test_braces_and_commas_inside_strings_are_data():
    assert extract_object('x {"s": "a, } b {", "t": ",]"} y') == {"s": "a, } b {", "t": ",]"}


def test_first_object_that_parses_wins_after_a_broken_one():
    assert extract_object('{"oops": } and then {"ok": true}') == {"ok": True}


@pytest.mark.parametrize(("answer", "reason"), [
    ("I cannot help with that.", "plain prose"),
    ('{"unterminated": ', "truncated"),
    ("[1, 2, 3]", "no JSON object"),
])
def test_no_object_is_reported(answer, reason):
    with pytest.raises(NoJsonObject, match=reason):
        extract_object(answer)


def test_oversized_answers_are_refused():
    with pytest.raises(NoJsonObject, match="characters long"):
        extract_object("{" * (MAX_TEXT + 1))


@pytest.mark.parametrize("broken", [
    "{'a': 1, 'b': 'it''s'}",
    '{a: 1, b: "x"}',
    '{"a": 1, // why\n "b": "x"}',
    '{"a": 1, /* why */ "b": "x"}',
    '{"a": 1, "b": "x", "c": True, "d": None}',
    '{"a": 1, "b": "two\nlines"}',
])
def test_broken_json_is_repaired_and_says_so(broken):
    found = next(objects(broken))
    assert found.value["a"] == 1 and found.repaired


def test_valid_json_is_never_handed_to_json_repair(monkeypatch):
    import adapter.extract as extract

    monkeypatch.setattr(extract.json_repair, "loads", lambda *a, **k: pytest.fail("json-repair called on valid JSON"))
    assert [f.value for f in objects('Sure:\n```json\n{"a": 1}\n```')] == [{"a": 1}]


@pytest.mark.parametrize("cut", [
    '{"score": 78, "reasoning": "Maria is VP',
    '```json\n{"score": 78, "bant": {"budget": "x"}\n```',
    'Here it is: {"variations": [{"type": "formal", "subject": "Hi"}',
])
def test_a_truncated_answer_is_never_completed(cut):
    # json-repair would close what is open and invent the rest; a nested complete object is no answer either.
    with pytest.raises(NoJsonObject, match="truncated"):
        list(objects(cut))


def test_only_a_bounded_broken_object_is_handed_to_json_repair():
    # json-repair holds the event loop for the length of its work: a huge broken object goes to repair.
    huge = "{'reasoning': '" + "word " * (REPAIR_MAX // 5) + "'}"
    with pytest.raises(NoJsonObject, match=f"too long to be read as such \\(at most {REPAIR_MAX}\\)"):
        list(objects(huge))
    assert next(objects(huge[: REPAIR_MAX - 100] + "'}")).repaired


def test_ansi_colour_codes_from_stdout_are_ignored():
    assert extract_object('\x1b[32m{"a": "\x1b[1mb"}\x1b[0m') == {"a": "b"}


@pytest.mark.parametrize(("score", "expected"), [(0, "Cold"), (39, "Cold"), (40, "Warm"), (69, "Warm"), (70, "Hot"), (100, "Hot")])
def test_classification_boundaries(score, expected):
    assert classify(score) == expected


def test_lead_classification_disagreeing_with_score_is_replaced():
    result, corrected = lead_result(text({**LEAD, "score": 85, "classification": "Cold"}), "l1", "A")
    assert result.classification == "Hot" and corrected
    result, corrected = lead_result(text(LEAD), "l1", "A")
    assert result.classification == "Warm" and not corrected


@pytest.mark.parametrize(("change", "message"), [
    ({"score": 101}, "<= 100"),
    ({"score": "80"}, "Expected `int`"),
    ({"next_actions": ["a", "b"]}, "length >= 3"),
    ({"next_actions": ["a"] * 6}, "length <= 5"),
    ({"reasoning": "too short"}, "at least 50"),
    ({"bant": {"budget": "x"}}, "missing required field `authority`"),
])
def test_lead_validator_rejects(change, message):
    with pytest.raises(OutputInvalid, match=message):
        lead_result(text({**LEAD, **change}), "l1", "A")


def _variations(*types: str, subject: str = "Hello") -> dict:
    return {"variations": [{"type": t, "subject": subject, "body": "p1\n\np2", "tone": "t"} for t in types]}


def test_email_variations_are_reordered():
    result = email_result(text(_variations("direct", "formal", "casual")), "l1", "A")
    assert [v.type for v in result.variations] == ["formal", "casual", "direct"]


@pytest.mark.parametrize(("payload", "message"), [
    (_variations("formal", "formal", "direct"), "more than once"),
    (_variations("formal", "casual"), "missing variation"),
    (_variations("formal", "casual", "direct", "casual"), "more than once"),
    (_variations("formal", "casual", "direct", subject="x" * 61), "length <= 60"),
    (_variations("formal", "casual", "shouty"), "Invalid enum value 'shouty'"),
])
def test_email_validator_rejects(payload, message):
    with pytest.raises(OutputInvalid, match=message):
        email_result(text(payload), "l1", "A")


def test_deal_validator_rounds_and_checks_dates():
    deal = {"win_probability": 55.4, "health_score": 70, "predicted_close_date": "2027-01-31", "risk_factors": [],
            "recommended_actions": ["x"], "reasoning": " ".join(["w"] * 100)}
    assert deal_result(text(deal), "d1", "A").win_probability == 55
    with pytest.raises(OutputInvalid, match="RFC3339"):
        deal_result(text({**deal, "predicted_close_date": "next month"}), "d1", "A")
    with pytest.raises(OutputInvalid, match="at least 100"):
        deal_result(text({**deal, "reasoning": "short"}), "d1", "A")
    assert deal_result(text({**deal, "predicted_close_date": None}), "d1", "A").predicted_close_date is None


# --- personas and validators cannot drift apart ---------------------------------------------

@pytest.mark.parametrize("task", sorted(TASKS))
def test_persona_example_output_passes_the_validator(task):
    agent = TASKS[task].agent_id
    persona = (AGENTS_DIR / agent / "persona.md").read_text()
    example = persona.split("## Example output", 1)[1]
    fenced = re.search(r"```json\n(.*?)```", example, re.DOTALL)
    assert fenced, f"{agent}/persona.md needs a ```json example under '## Example output'"
    result, corrected = TASKS[task].validate(fenced.group(1), "65f1c0ffee0000000000a001", agent)
    assert not corrected, "the example's classification must agree with its score"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_persona_documents_the_input_the_sidecar_renders(task):
    agent = TASKS[task].agent_id
    persona = (AGENTS_DIR / agent / "persona.md").read_text()
    rendered = TASKS[task].render({"name": "N"}, TASKS[task].request_type(**{TASKS[task].id_field: "0" * 24}),
                                  __import__("datetime").date(2026, 11, 23))
    assert f"TASK: {task}" in persona and f"TASK: {task}" in rendered
    record = msgspec.json.decode(re.search(r"<crm_record>\n(.*)\n</crm_record>", rendered).group(1))
    for field in record:  # every field the sidecar sends is one the persona describes
        assert f'"{field}"' in persona, f"{agent}/persona.md does not document input field {field!r}"


@pytest.mark.parametrize("agent", sorted(t.agent_id for t in TASKS.values()))
def test_definitions_have_conductor_fields(agent):
    definition = yaml.safe_load((AGENTS_DIR / agent / "definition.yaml").read_text())
    assert definition["name"] == agent
    for field in ("version", "schema_version", "description", "author", "tags", "capabilities", "allowed_tools"):
        assert field in definition, f"{agent}/definition.yaml lacks {field}"


def test_agent_version_changes_with_persona(tmp_path):
    import shutil

    shutil.copytree(AGENTS_DIR, tmp_path / "agents")
    before = load_tasks(str(tmp_path / "agents"))
    persona = tmp_path / "agents" / "DealPredictor_CRM_Agent" / "persona.md"
    persona.write_text(persona.read_text() + "\nOne more rule.\n")
    after = load_tasks(str(tmp_path / "agents"))
    assert before["deal.predict"].version != after["deal.predict"].version
    assert before["lead.qualify"].version == after["lead.qualify"].version


def test_missing_agents_dir_stops_startup(tmp_path):
    with pytest.raises(ConfigError, match="CONDUCTOR_AGENTS_DIR"):
        load_tasks(str(tmp_path))
