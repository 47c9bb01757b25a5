"""Extraction of the model's JSON, the validators, and the personas they must agree with."""

from __future__ import annotations

import datetime as dt
import re

import msgspec
import pytest
import yaml
from httpx_sse import aconnect_sse
from structlog.testing import capture_logs

from adapter.tasks import TASKS
from adapter.tasks.extract import MAX_TEXT, REPAIR_MAX, NoJsonObject, extract_object, objects
from adapter.tasks.prompting import repair_input
from adapter.settings import ConfigError
from adapter.tasks import deal_predict, email_generate, lead_qualify
from adapter.tasks.deal_predict import validate as deal_result
from adapter.tasks.email_generate import validate as email_result
from adapter.tasks.lead_qualify import classify
from adapter.tasks.lead_qualify import validate as lead_result
from adapter.tasks.reading import OutputInvalid, rules
from tests.helpers import AGENTS_DIR, EMAIL_AGENT, LEAD_AGENT, decode, make_settings, metric

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
    ('```json\n"{x}"\n```', "no parseable JSON object"),
    ('{"a": ' + "[" * 3000 + "]" * 3000 + "}", "no parseable JSON object"),  # nesting too deep to decode
    ('{"a": ' + "[" * 3000 + "]" * 3000 + ",}", "no parseable JSON object"),  # ... or to repair (under REPAIR_MAX)
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
    import adapter.tasks.extract as extract

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
    verdict = lead_result(text({**LEAD, "score": 85, "classification": "Cold"}), "l1", "A")
    assert verdict.result.classification == "Hot" and verdict.corrected
    verdict = lead_result(text(LEAD), "l1", "A")
    assert verdict.result.classification == "Warm" and not verdict.corrected and verdict.normalised == ()


@pytest.mark.parametrize(("change", "message"), [
    ({"score": 101}, "`score` 101 is outside 0-100"),
    ({"score": 0.4}, "`score` 0.4 looks like a fraction; answer a percentage 0-100"),
    ({"score": "0,4"}, 'looks like a fraction'),
    ({"score": True}, "`score` must be a number 0-100, got a boolean"),
    ({"score": "high"}, '`score` must be a number 0-100, got a string "high"'),
    ({"score": None}, "`score` must be a number 0-100, got null"),
    ({"next_actions": []}, "at least 1 required"),
    ({"next_actions": ["", "  "]}, "at least 1 required"),
    ({"reasoning": ""}, "`reasoning` is empty"),
    ({"reasoning": ["a", "b"]}, "`reasoning` must be a string, got an array"),
    ({"bant": {"budget": "x"}}, "`bant.authority` is missing"),
    ({"bant": {"budget": 3, "authority": "y", "need": "z", "timeline": "t"}}, "`bant.budget` must be a string"),
])
def test_lead_contract_breaches_go_to_repair(change, message):
    with pytest.raises(OutputInvalid) as caught:
        lead_result(text({**LEAD, **change}), "l1", "A")
    assert any(message in e for e in caught.value.errors), caught.value.errors


def test_an_infinite_number_goes_to_repair():
    with pytest.raises(OutputInvalid, match="`score` must be a finite number"):
        lead_result(text(LEAD).replace('"score":55', '"score":1e999'), "l1", "A")


def test_every_contract_error_is_named_at_once():
    with pytest.raises(OutputInvalid) as caught:
        deal_result(text({**DEAL, "win_probability": 0.3, "health_score": 140, "recommended_actions": []}), "d1", "A")
    assert len(caught.value.errors) == 3


@pytest.mark.parametrize(("change", "rule"), [
    ({"reasoning": "too short"}, "reasoning-length"),
    ({"next_actions": ["a", "b"]}, "next-actions-count"),
    ({"next_actions": ["a"] * 6}, "next-actions-count"),
])
def test_lead_guidance_breaches_are_accepted_and_reported(change, rule):
    verdict = lead_result(text({**LEAD, **change}), "l1", "A")
    assert rules(verdict.warnings) == [rule]
    assert verdict.result.next_actions == change.get("next_actions", LEAD["next_actions"])  # more are kept, not trimmed


def _variations(*types: str, subject: str = "Hello", body: str = "p1\n\np2") -> dict:
    return {"variations": [{"type": t, "subject": subject, "body": body, "tone": "t"} for t in types]}


def test_email_variations_are_reordered():
    verdict = email_result(text(_variations("direct", "formal", "casual")), "l1", "A")
    assert [v.type for v in verdict.result.variations] == ["formal", "casual", "direct"] and verdict.normalised == ()


@pytest.mark.parametrize(("payload", "message"), [
    (_variations("formal", "formal", "direct"), "more than once"),
    (_variations("formal", "casual"), "missing variation"),
    (_variations("formal", "casual", "direct", "casual"), "more than once"),
    (_variations("formal", "casual", "direct", subject="x" * 61), "has 61 characters, at most 60 are allowed"),
    (_variations("formal", "casual", "shouty"), '`variations[2].type` "shouty" is not one of'),
    ({"variations": "three emails"}, "`variations` must be an array"),
])
def test_email_contract_breaches_go_to_repair(payload, message):
    with pytest.raises(OutputInvalid) as caught:
        email_result(text(payload), "l1", "A")
    assert any(message in e for e in caught.value.errors), caught.value.errors


@pytest.mark.parametrize(("body", "rule"), [
    ("one paragraph only", "email-paragraphs"),
    ("\n\n".join(["p"] * 6), "email-paragraphs"),
    ("Hi,\n\nOnly $49 a month.", "email-pricing"),
    ("Hi,\n\nAct now: this offer ends Friday.", "email-spam-words"),
    ("Olá,\n\nTeste grátis por 30 dias.", "email-spam-words"),
])
def test_email_guidance_breaches_are_accepted_and_reported(body, rule):
    verdict = email_result(text(_variations("formal", "casual", "direct", body=body)), "l1", "A")
    assert rules(verdict.warnings) == [rule] and len(verdict.warnings) == 3  # one per email, one rule id


@pytest.mark.parametrize(("phrase", "rule"), [
    *[(w, "email-spam-words") for w in ("FREE", "grátis", "gratuito", "guaranteed", "Garantia", "garantido", "act now",
                                         "aja agora", "risk-free", "limited time", "no obligation", "click here",
                                         "clique aqui", "buy now", "compre já")],
    *[(w, "email-pricing") for w in ("R$ 99", "US$ 10", "$49", "€20", "£5", "20% off", "15% de desconto", "Discounted",
                                      "descontos", "our pricing", "prices", "PREÇO", "orçamento de 5 mil", "per seat",
                                      "per user", "por usuário")],
])
def test_every_word_the_guidance_knows_is_caught(phrase, rule):
    # The substring pre-checks in front of the regexes must never hide a match.
    body = f"Hi,\n\nA line with {phrase} in it.\n\nBest"
    assert rules(email_result(text(_variations("formal", "casual", "direct", body=body)), "l1", "A").warnings) == [rule]


def test_email_without_style_problems_has_no_warnings():
    body = "Hi Maria,\n\nFeel free to reply with a time that suits you.\n\nBest"
    assert email_result(text(_variations("formal", "casual", "direct", body=body)), "l1", "A").warnings == ()


DEAL = {"win_probability": 55.4, "health_score": 70, "predicted_close_date": "2027-01-31", "risk_factors": [],
        "recommended_actions": ["x"], "reasoning": " ".join(["w"] * 100)}


@pytest.mark.parametrize(("value", "expected"), [
    ("2027-01-31", dt.date(2027, 1, 31)),
    ("2027-01-31T18:30:00", dt.date(2027, 1, 31)),
    ("2027-01-31 18:30", dt.date(2027, 1, 31)),
    ("2027-01-31T23:59:00-03:00", dt.date(2027, 1, 31)),  # the date as written, not moved to UTC
    ("31/01/2027", dt.date(2027, 1, 31)),
    ("1/2/2027", dt.date(2027, 2, 1)),  # DD/MM: the CRM is Brazilian
    ("31/01/2027 10:00", dt.date(2027, 1, 31)),
    (None, None),
    ("", None),
])
def test_deal_dates_are_read_as_a_brazilian_reader_would(value, expected):
    assert deal_result(text({**DEAL, "predicted_close_date": value}), "d1", "A").result.predicted_close_date == expected


@pytest.mark.parametrize("value", ["next month", "2027-13-01", "12/31/2027", "31/02/2027", 20270131])
def test_deal_dates_that_cannot_be_read_go_to_repair(value):
    with pytest.raises(OutputInvalid, match="predicted_close_date"):
        deal_result(text({**DEAL, "predicted_close_date": value}), "d1", "A")


def test_deal_rounds_precision_but_never_a_unit():
    assert deal_result(text(DEAL), "d1", "A").result.win_probability == 55
    assert deal_result(text({**DEAL, "win_probability": "55%"}), "d1", "A").result.win_probability == 55
    for fraction in (0.55, "0.55", 0.999, 0.001):
        with pytest.raises(OutputInvalid, match="looks like a fraction; answer a percentage 0-100"):
            deal_result(text({**DEAL, "win_probability": fraction}), "d1", "A")
    for edge in (0, 1, 100):  # not strictly between 0 and 1
        assert deal_result(text({**DEAL, "win_probability": edge}), "d1", "A").result.win_probability == edge
    verdict = deal_result(text({**DEAL, "reasoning": "short"}), "d1", "A")
    assert rules(verdict.warnings) == ["reasoning-length"]


def test_a_wrapper_is_unwrapped_only_when_nothing_else_is_there():
    assert lead_result(text({"result": LEAD}), "l1", "A").normalised == ("the answer was wrapped in `result`: unwrapped",)
    with pytest.raises(OutputInvalid):
        lead_result(text({"result": LEAD, "status": "ok"}), "l1", "A")


def test_guidance_is_recomputed_from_a_served_body():
    verdict = lead_result(text({**LEAD, "reasoning": "too short", "next_actions": ["a"]}), "l1", "A")
    body = msgspec.json.encode(verdict.result)
    assert TASKS["lead.qualify"].warnings(body) == rules(verdict.warnings) == ["reasoning-length", "next-actions-count"]


def test_a_body_that_cannot_be_reread_has_no_warnings_rather_than_an_error():
    assert TASKS["lead.qualify"].warnings(b'{"lead_id": "l1"}') == []


def test_repair_prompt_quotes_contract_errors_only():
    answer = text({**DEAL, "win_probability": 0.55, "reasoning": "short"})  # a contract error and a guidance breach
    with pytest.raises(OutputInvalid) as caught:
        deal_result(answer, "d1", "A")
    prompt = repair_input("TASK: deal.predict", answer, caught.value.errors)
    assert "`win_probability` 0.55 looks like a fraction; answer a percentage 0-100" in prompt
    assert "words" not in prompt.split("<previous_answer>")[0]


# --- guidance reaches the caller, the log and the metrics; never a repair call ----------------

EMAIL = "/api/v1/ai/email/generate"
# The gateway double writes the request's context into every email: a salesperson's "free pilot"
# becomes a spam-trigger word in the model's answer, as it would with a real model.
FREE = "our free pilot programme"


async def test_guidance_breach_is_served_with_warnings_logged_and_counted_once(client, seed, auth, gateway):
    request = {"lead_id": seed["leads"][0], "context": FREE}
    with capture_logs() as logs:
        r = await client.post(EMAIL, json=request, headers=auth)
    assert r.status_code == 200 and r.headers["x-agent-warnings"] == "email-spam-words"
    assert gateway.calls[EMAIL_AGENT] == 1  # accepted as it was: no repair call
    [event] = [e for e in logs if e["event"] == "agent.guidance"]
    assert event["agent"] == EMAIL_AGENT and event["rules"] == ["email-spam-words"] and len(event["details"]) == 3
    assert not [e for e in logs if e["event"] == "agent.output_invalid"]

    hit = await client.post(EMAIL, json=request, headers=auth)  # recomputed from the cached body
    assert hit.headers["x-cache"] == "HIT" and hit.headers["x-agent-warnings"] == "email-spam-words"
    assert hit.content == r.content and "warnings" not in decode(hit)  # the body is the contract's, nothing more
    metrics = (await client.get("/metrics")).text
    assert metric(metrics, "crm_ai_agent_guidance_total", agent=EMAIL_AGENT, rule="email-spam-words") == 1  # one answer
    assert metric(metrics, "crm_ai_agent_output_total", agent=EMAIL_AGENT, outcome="valid") == 1


async def test_a_browser_may_read_the_warnings(make_client, seed, auth):
    origin = "http://localhost:4200"
    async with make_client(settings=make_settings(cors_allow_origins=origin)) as client:
        r = await client.post(EMAIL, json={"lead_id": seed["leads"][0], "context": FREE}, headers={**auth, "Origin": origin})
    assert "x-agent-warnings" in r.headers["access-control-expose-headers"].lower()


async def test_an_answer_within_guidance_has_no_warnings_header(client, seed, auth):
    r = await client.post(EMAIL, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert r.status_code == 200 and "x-agent-warnings" not in r.headers


async def test_short_reasoning_is_served_not_repaired(client, seed, auth, gateway, monkeypatch):
    # The case: 36 words of reasoning used to cost a repair call and then a 502.
    import adapter.doubles.answers as double

    terse = {**LEAD, "score": 72, "classification": "Hot", "reasoning": " ".join(["word"] * 36)}
    monkeypatch.setattr(double, "answer_for", lambda *_: terse)
    r = await client.post("/api/v1/ai/lead/qualify", json={"lead_id": seed["leads"][0]}, headers=auth)
    assert r.status_code == 200 and r.headers["x-agent-warnings"] == "reasoning-length"
    assert gateway.calls[LEAD_AGENT] == 1 and decode(r)["score"] == 72


async def test_stream_result_carries_the_same_warnings(client, seed, auth):
    async def result_of(body: dict) -> dict:
        async with aconnect_sse(client, "POST", EMAIL + "/stream", json=body, headers=dict(auth)) as source:
            events = [e async for e in source.aiter_sse() if e.event == "result"]
        return msgspec.json.decode(events[0].data)

    fresh = await result_of({"lead_id": seed["leads"][0], "context": FREE})
    cached = await result_of({"lead_id": seed["leads"][0], "context": FREE})
    assert fresh["warnings"] == cached["warnings"] == ["email-spam-words"] and fresh["variations"]
    assert "warnings" not in await result_of({"lead_id": seed["leads"][0]})


# --- personas and validators cannot drift apart ---------------------------------------------

@pytest.mark.parametrize(("task", "guidance", "contract"), [
    ("lead.qualify", [f"at least {lead_qualify.REASONING_WORDS} words", f"{lead_qualify.NEXT_ACTIONS[0]} to {lead_qualify.NEXT_ACTIONS[1]} specific"],
     ["0 to 100", "never a fraction", "must agree with the score", "at least one non-empty action"]),
    ("deal.predict", [f"at least {deal_predict.REASONING_WORDS} words", "no earlier than `today`"],
     ["never a fraction", "`YYYY-MM-DD`, or null", "at least one non-empty action"]),
    ("email.generate", [f"{email_generate.PARAGRAPHS[0]} to {email_generate.PARAGRAPHS[1]} paragraphs", "no spam-trigger words", "no pricing"],
     ["exactly three items", f"at most {email_generate.SUBJECT_MAX} characters"]),
])
def test_personas_say_which_rules_are_contract_and_which_guidance(task, guidance, contract):
    persona = (AGENTS_DIR / TASKS[task].agent_id / "persona.md").read_text()
    table = persona.split("## Output format", 1)[1].split("## Example output", 1)[0]
    assert "**contract**" in table and "**guidance**" in table
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| `")]
    contract_cells = " ".join(r[-3] for r in rows) + " " + " ".join(l for l in table.splitlines() if l.startswith("- Contract"))
    guidance_cells = " ".join(r[-2] for r in rows) + " " + " ".join(l for l in table.splitlines() if l.startswith("- Guidance"))
    for rule in guidance:
        assert rule in guidance_cells and rule not in contract_cells, f"{rule!r} is guidance in its task module"
    for rule in contract:
        assert rule in contract_cells and rule not in guidance_cells, f"{rule!r} is contract in its task module"


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
    before = TASKS.load(str(tmp_path / "agents"))
    persona = tmp_path / "agents" / "DealPredictor_CRM_Agent" / "persona.md"
    persona.write_text(persona.read_text() + "\nOne more rule.\n")
    after = TASKS.load(str(tmp_path / "agents"))
    assert before["deal.predict"].version != after["deal.predict"].version
    assert before["lead.qualify"].version == after["lead.qualify"].version


def test_missing_agents_dir_stops_startup(tmp_path):
    with pytest.raises(ConfigError, match="CONDUCTOR_AGENTS_DIR"):
        TASKS.load(str(tmp_path))
