"""Every prompt template the engines send to a model, in one place, versioned.

TEMPLATE_VERSION is hashed into cache keys and returned with results, so changing any
template below must bump it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEMPLATE_VERSION = "2026-12-04.1"

# The verifier's default system prompt (a setting: DVREWARD_VERIFIER_SYSTEM_PROMPT). Its contract is the
# method's: judge strictly, answer with the bare word yes or no, and no when the subject is absent.
VERIFIER_SYSTEM_PROMPT = (
    "You audit AI-generated images. Judge strictly whether the image satisfies the question. Reply with "
    "exactly one word, yes or no, with no punctuation and nothing else. If anything the question is about "
    "is missing from the image, reply no."
)


def template_hash() -> str:
    """Short digest of every template, so results name exactly what produced them."""
    from server.engines import prompts as mod

    text = "\n".join(
        f"{k}={v}" for k, v in sorted(vars(mod).items()) if k.isupper() and isinstance(v, str)
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# --- Decomposer ----------------------------------------------------------------------------
# Placeholders are filled with str.format; the user's prompt is passed as an argument, so
# braces inside it are never interpreted. Literal JSON braces here are doubled.

DECOMPOSER_SYSTEM = (
    "You turn text-to-image prompts into atomic yes/no questions that decide whether a generated "
    "image matches the prompt. Reply in exactly the format requested and nothing else."
)

_QUALITY_RULES = (
    "Quality questions ask whether what the prompt asks for is rendered well. Each checks one aspect "
    "of: {aspects} (Geometry = shapes, perspective and straight lines; Anatomy = bodies, faces and "
    "hands; Texture = surfaces and materials; Coherence = parts fit together, nothing duplicated or "
    "fused; Lighting = consistent light and shadows; Physics = plausible support, contact and "
    "reflections; Legibility = requested text is readable and spelled right; Aesthetics = composition "
    "and overall appeal). Phrase them so that yes means good, never ask about anything the prompt did "
    "not state, and let the prompt win over realism (for \"a floating stone\" ask whether the stone "
    "clearly floats)."
)

DECOMPOSER_FAST = (
    "Prompt: {prompt}\n\n"
    "Write the questions as one JSON object with two lists.\n"
    "\"semantic\": atomic yes/no questions, one fact each, that together check everything the prompt "
    "asks for and nothing more; yes means the image shows the fact. Each item has \"id\" (\"s1\", "
    "\"s2\", ... in order), \"text\" (the question), \"tag\" (one of: {tags}) and \"depends_on\" (ids "
    "of earlier questions that must be answered yes for this one to make sense; a question about the "
    "cat's colour depends on \"Is there a cat?\").\n"
    "\"quality\": items with \"id\" (\"q1\", \"q2\", ...), \"text\" and \"aspect\". "
    + _QUALITY_RULES
    + "\n\nExample: {{\"semantic\": [{{\"id\": \"s1\", \"text\": \"Is there a cat?\", \"tag\": "
    "\"Existence\", \"depends_on\": []}}, {{\"id\": \"s2\", \"text\": \"Is the cat black?\", \"tag\": "
    "\"Attribute\", \"depends_on\": [\"s1\"]}}], \"quality\": [{{\"id\": \"q1\", \"text\": \"Is the "
    "cat anatomically correct?\", \"aspect\": \"Anatomy\"}}]}}"
)

DECOMPOSER_EDIT = (
    "Editing instruction: {prompt}\n\n"
    "An image was edited by following this instruction; each question will be asked with the original image "
    "shown first and the edited one second. Write the questions as one JSON object with two lists.\n"
    "\"semantic\": atomic yes/no questions about the edited image, one fact each, where yes means the edit is "
    "right. First, one question per change the instruction asks for (was it made, and made as asked); then "
    "questions that what the instruction does not mention was kept as in the original (the subject, the "
    "background, the layout, any text, as far as the instruction leaves them alone). Never ask for anything "
    "the instruction does not imply. Each item has \"id\" (\"s1\", \"s2\", ... in order), \"text\", \"tag\" "
    "(one of: {tags}) and \"depends_on\" (ids of earlier questions that must be answered yes for this one to "
    "make sense).\n"
    "\"quality\": items with \"id\" (\"q1\", \"q2\", ...), \"text\" and \"aspect\", about how well the edit "
    "is rendered and blended into the image. "
    + _QUALITY_RULES
    + "\n\nExample for \"make the car red\": {{\"semantic\": [{{\"id\": \"s1\", \"text\": \"Is the car in "
    "the edited image red?\", \"tag\": \"Attribute\", \"depends_on\": []}}, {{\"id\": \"s2\", \"text\": \"Is "
    "the background the same as in the original image?\", \"tag\": \"Environment\", \"depends_on\": []}}], "
    "\"quality\": [{{\"id\": \"q1\", \"text\": \"Is the new colour applied evenly across the car's body?\", "
    "\"aspect\": \"Texture\"}}]}}"
)

# In-context examples for the dsg pipeline: two human-written decompositions of the DSG TIFA160 set
# (Apache-2.0), with its action and global categories written in this pipeline's categories.
_DSG_EXAMPLES: tuple[dict[str, Any], ...] = (
    {
        "prompt": "A man in a black suit surfing a large wave",
        "tuples": [("entity", "whole", ["man"]), ("entity", "whole", ["suit"]), ("entity", "whole", ["wave"]),
                   ("attribute", "color", ["suit", "black"]), ("attribute", "size", ["wave", "large"]),
                   ("relation", "action", ["man", "wave", "surf"])],
        "parents": [[], [], [], ["t2"], ["t3"], ["t1", "t3"]],
        "questions": ["Is there a man?", "Is there a suit?", "Is there a wave?", "Is the suit black?",
                      "Is the wave large?", "Is the man surfing on the wave?"],
    },
    {
        "prompt": "Black and white photograph of a bed with a laptop on it.",
        "tuples": [("global", "style", ["photograph"]), ("entity", "whole", ["bed"]), ("entity", "whole", ["laptop"]),
                   ("global", "style", ["black and white"]), ("relation", "spatial", ["laptop", "bed", "on"])],
        "parents": [[], [], [], [], ["t2", "t3"]],
        "questions": ["Is this a photograph?", "Is there a bed?", "Is there a laptop?",
                      "Is the photograph black and white?", "Is the laptop on the bed?"],
    },
)


def _braced(obj: Any) -> str:
    """JSON with braces doubled, to sit inside a str.format template."""
    return json.dumps(obj).replace("{", "{{").replace("}", "}}")


def _tuples_of(ex: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"id": f"t{i}", "category": c, "type": t, "args": a} for i, (c, t, a) in enumerate(ex["tuples"], 1)]


def render_tuple(tid: str, category: str, type_: str, args: Sequence[str]) -> str:
    """A DSG tuple as the later stages show it to the model, e.g. `t2 | attribute - color (cat, black)`."""
    return f"{tid} | {category} - {type_} ({', '.join(args)})"


def _rendered_tuples(ex: dict[str, Any]) -> str:
    return "\n".join(render_tuple(f"t{i}", c, t, a) for i, (c, t, a) in enumerate(ex["tuples"], 1))


DSG_TUPLES_EXAMPLES = "".join(
    f"Example prompt: {ex['prompt']}\nAnswer: {_braced({'tuples': _tuples_of(ex)})}\n" for ex in _DSG_EXAMPLES
)
DSG_DEPENDENCIES_EXAMPLES = "".join(
    f"Example prompt: {ex['prompt']}\nTuples:\n{_rendered_tuples(ex)}\nAnswer: "
    + _braced({"dependencies": [{"id": f"t{i}", "parents": ps} for i, ps in enumerate(ex["parents"], 1)]}) + "\n"
    for ex in _DSG_EXAMPLES
)
DSG_QUESTIONS_EXAMPLES = "".join(
    f"Example prompt: {ex['prompt']}\nTuples:\n{_rendered_tuples(ex)}\nAnswer: "
    + _braced({"questions": [{"id": f"t{i}", "text": q} for i, q in enumerate(ex["questions"], 1)]}) + "\n"
    for ex in _DSG_EXAMPLES
)

DSG_TUPLES = (
    DSG_TUPLES_EXAMPLES + "\n"
    "Prompt: {prompt}\n\n"
    "Break the prompt into Davidsonian scene-graph tuples: the atomic facts an image must show for "
    "the prompt to hold. Categories: \"entity\" (an object or person; type whole or part), "
    "\"attribute\" (a property of an entity; type such as color, count, material, shape, size, "
    "texture, state or text), \"relation\" (between entities; type spatial or action) and \"global\" "
    "(the whole image; type such as style, viewpoint, environment or lighting). \"args\" names the "
    "entities and the value: entity whole (cat); attribute color (cat, black); relation spatial "
    "(cat, table, on). Number the tuples t1, t2, ... in order. Keep every fact the prompt states and "
    "add none it does not.\n"
    "Answer as JSON: {{\"tuples\": [{{\"id\": \"t1\", \"category\": \"entity\", \"type\": \"whole\", "
    "\"args\": [\"cat\"]}}]}}"
)

DSG_DEPENDENCIES = (
    DSG_DEPENDENCIES_EXAMPLES + "\n"
    "Prompt: {prompt}\nTuples:\n{tuples}\n\n"
    "For every tuple list the earlier tuples it depends on: an attribute, part or relation of an "
    "entity depends on the tuple saying that the entity exists; entities and global tuples usually "
    "depend on nothing.\n"
    "Answer as JSON with one item per tuple, in order: {{\"dependencies\": [{{\"id\": \"t1\", "
    "\"parents\": []}}, {{\"id\": \"t2\", \"parents\": [\"t1\"]}}]}}"
)

DSG_QUESTIONS = (
    DSG_QUESTIONS_EXAMPLES + "\n"
    "Prompt: {prompt}\nTuples:\n{tuples}\n\n"
    "Turn every tuple into one natural yes/no question about the image, answerable by looking at it, "
    "where yes means the image shows the fact: entity whole (cat) becomes \"Is there a cat?\", "
    "attribute color (cat, black) becomes \"Is the cat black?\".\n"
    "Answer as JSON with one item per tuple, in order: {{\"questions\": [{{\"id\": \"t1\", \"text\": "
    "\"Is there a cat?\"}}]}}"
)

DSG_VALIDITY = (
    "Prompt: {prompt}\nQuestion: {question}\n\n"
    "Is this question strictly required by the prompt, that is, would an image for which the answer "
    "is no fail to match the prompt? An ambiguous noun may be read as the object alone (for \"a jump "
    "rope\", asking whether there is a jump rope is fine). Answer yes or no."
)

DSG_VALIDITY_REASON = (
    "Prompt: {prompt}\nQuestion: {question}\n\n"
    "This question was judged not strictly required by the prompt. In one sentence, say why.\n"
    "Answer as JSON: {{\"reason\": \"...\"}}"
)

DSG_TAG = (
    "Prompt: {prompt}\nQuestion: {question}\n\n"
    "Which one category does the question check? Style = artistic style or medium; Environment = "
    "setting or background; Viewpoint = camera angle or framing; Existence = an object is present; "
    "Count = how many; Attribute = colour, material, shape, size or state; Action = what someone or "
    "something does; Spatial = relative position; Text = written text in the image; Negative = "
    "something that must be absent. Answer with one of: {tags}."
)

DSG_QUALITY = (
    "Prompt: {prompt}\nSemantic questions already asked:\n{questions}\n\n"
    + _QUALITY_RULES
    + "\nWrite the quality questions this prompt needs (none if nothing needs checking), with ids "
    "q1, q2, ... in order.\n"
    "Answer as JSON: {{\"quality\": [{{\"id\": \"q1\", \"text\": \"Is the cat anatomically "
    "correct?\", \"aspect\": \"Anatomy\"}}]}}"
)


def template_version(verifier_system_prompt: str | None = None) -> str:
    """TEMPLATE_VERSION plus a digest of the templates (and of the verifier's system prompt, when given).

    Cache keys and results follow any edit, including a system prompt set by a deployment.
    """
    if verifier_system_prompt is None:
        return f"{TEMPLATE_VERSION}+{template_hash()}"
    digest = hashlib.sha256(f"{template_hash()}\n{verifier_system_prompt}".encode()).hexdigest()[:12]
    return f"{TEMPLATE_VERSION}+{digest}"


def read_system_prompt(path: str | Path) -> str:
    """A verifier system prompt from a UTF-8 file (surrounding whitespace dropped); unreadable is a ValueError."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the verifier system prompt file {str(path)!r}: {exc}") from exc
