"""The agent-output corpus: answers of the kind real models give, and what the sidecar must make of each.

Every file under conductor-agents/<Agent>/corpus/ is one answer (see conductor-agents/README.md): a YAML header
between `---` lines, then the model's raw text, byte for byte. A model's answer that surprises you
becomes one more file; nothing here needs editing.
"""

from __future__ import annotations

import re

import pytest

from adapter.upstreams.gateway import ProviderPlan
from adapter.tasks import TASKS
from adapter.errors import InvalidAgentOutput
from adapter.pipeline.service import AiService
from adapter.settings import Settings
from tests.agent_outputs import OUTCOMES, Answer, check_answer, load_corpus
from tests.helpers import AGENTS_DIR, RECORD_ID

GUIDANCE = TASKS.guidance_rules
ANSWERS = load_corpus()
REPAIRS = [a for a in ANSWERS if a.outcome == "repair"]
ACCEPTED = [a for a in ANSWERS if a.outcome != "repair"]


def ids(answers: list[Answer]) -> list[str]:
    return [a.id for a in answers]


# --- the corpus itself is well formed ---------------------------------------------------------

def test_corpus_is_large_and_every_answer_is_well_formed():
    assert len(ANSWERS) >= 60
    for a in ANSWERS:
        assert a.outcome in OUTCOMES, f"{a.path}: outcome must be one of {OUTCOMES}"
        assert a.why, f"{a.path}: say in `why` what makes this answer worth keeping"
        assert (a.error is not None) == (a.outcome == "repair"), f"{a.path}: `error` goes with `repair`, and only with it"
        assert a.outcome != "accept-normalised" or a.expect, f"{a.path}: accept-normalised needs `expect`"
        assert set(a.warnings) <= GUIDANCE.keys(), f"{a.path}: unknown guidance rule(s) {set(a.warnings) - GUIDANCE.keys()}"
    for task in TASKS:
        assert {a.outcome for a in ANSWERS if a.task == task} == set(OUTCOMES), f"{task}: every outcome is represented"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_persona_examples_are_in_the_corpus(task):
    agent = TASKS[task].agent_id
    persona = (AGENTS_DIR / agent / "persona.md").read_text()
    examples = re.findall(r"```json\n(.*?)```", persona.split("## Example output", 1)[1], re.DOTALL)
    assert examples, f"{agent}/persona.md needs a ```json example under '## Example output'"
    corpus = {a.text: a for a in ANSWERS if a.task == task}
    for example in examples:
        assert example in corpus, f"{agent}/persona.md's example output is not in {agent}/corpus/"
        assert corpus[example].outcome == "accept" and not corpus[example].warnings, \
            "a persona's own example must meet its contract and its guidance"


# --- every answer gets its expected outcome ---------------------------------------------------

@pytest.mark.parametrize("answer", ANSWERS, ids=ids(ANSWERS))
def test_answer_has_its_expected_outcome(answer: Answer):
    check_answer(TASKS[answer.task], answer, RECORD_ID)


class _Model:
    """The gateway as validated() sees it: every repair call answers `text` again."""

    def __init__(self, text: str | None) -> None:
        self.text = text
        self.prompts: list[str] = []

    def plan(self) -> ProviderPlan:
        return ProviderPlan()

    async def execute(self, agent_id: str, input_text: str, plan: ProviderPlan | None = None, *,
                      conversation_id: str | None = None) -> str:
        self.prompts.append(input_text)
        if self.text is None:
            raise AssertionError("a model call was made for an answer that needed none")
        return self.text


def _service(model: _Model) -> AiService:
    return AiService(tasks=TASKS, gateway=model, crm=None, cache=None, settings=Settings.from_env({}))  # type: ignore[arg-type]


@pytest.mark.parametrize("answer", REPAIRS, ids=ids(REPAIRS))
async def test_a_repair_answer_never_comes_back_as_a_result(answer: Answer):
    model = _Model(answer.text)  # the model keeps giving the same answer
    service = _service(model)
    with pytest.raises(InvalidAgentOutput) as caught:
        await service.validated(TASKS[answer.task], RECORD_ID, "TASK PROMPT", answer.text)
    assert len(model.prompts) == service.settings.agent_repair_attempts
    assert all(answer.error in p for p in model.prompts), "the repair prompt quotes the contract error"
    assert answer.error in caught.value.detail


@pytest.mark.parametrize("answer", ACCEPTED, ids=ids(ACCEPTED))
async def test_an_accepted_answer_costs_no_model_call(answer: Answer):
    model = _Model(None)
    result = await _service(model).validated(TASKS[answer.task], RECORD_ID, "TASK PROMPT", answer.text)
    assert isinstance(result, TASKS[answer.task].result_type) and model.prompts == []
