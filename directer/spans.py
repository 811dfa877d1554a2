"""Finding instruction spans automatically: the sentences and clauses that constrain the answer.

Directer steers only the instruction's tokens; when a row names none, :func:`find_instruction_spans`
finds them. It is rule-based (no model, no network, thousands of prompts per second): the prompt is
cut into sentences, sentences into clauses at ``and``/``but``/``;``, and a clause is an instruction
when it states a verifiable constraint on the response, e.g. its length, format, case, punctuation,
keywords, language, start or end, repetition, sections, JSON, placeholders or postscript. The task
itself ("Write a poem about the sea") is left alone.

Catches: "Answer in all capital letters.", "Your response should contain at least 3 paragraphs
separated by ***", "... and do not use any commas", "Include the keywords 'atlantis' and 'constable'",
"End your response with 'Is there anything else I can help with?'", "P.S.", "<<title>>",
"Wrap your entire response in double quotation marks".
Misses: constraints phrased as the task ("Write a 5-line poem"), implicit ones ("Make it short"),
and, by design, the task's own subject.
"""

from __future__ import annotations

import re

CharSpan = tuple[int, int]
# what found a row's spans, recorded in its output (``span_detector``): bump it whenever what
# :func:`find_instruction_spans` finds changes, so rows of different detectors can be told apart
DETECTOR = "rules-1"

_NUMBER = r"(?:\d+|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|fifty|hundred)"
_UNITS = (
    r"(?:words?|sentences?|paragraphs?|bullet(?:\s+points?)?|sections?|times|letters?|placeholders?|"
    r"highlighted\s+sections?|parts?|characters?|lines?|items?|points?|responses?)"
)
_RESPONSE = r"(?:response|answer|reply|output|essay|poem|story|letter|email|text|article|blog|rap|song|post|summary)"

# Each pattern is evidence that a clause constrains the response rather than states the task.
CONSTRAINT_PATTERNS = [
    rf"\b(?:at\s+least|at\s+most|less\s+than|more\s+than|fewer\s+than|no\s+more\s+than|no\s+less\s+than|exactly|"
    rf"under|over|maximum\s+of|minimum\s+of|up\s+to|around)\s+{_NUMBER}\b",
    rf"\b{_NUMBER}\s+(?:or\s+(?:more|fewer|less)\s+)?{_UNITS}\b",
    r"\b(?:all\s+)?(?:capital(?:ized|s)?|upper\s*case|lower\s*case|caps|capitalization|capital\s+letters)\b",
    r"\bcommas?\b",
    r"\bkey\s*words?\b",
    r"\b(?:the\s+)?(?:word|phrase|letter)s?\s+[\"'“‘*]",
    r"\bletter\s+[\"'“]?[a-z][\"'”]?\s",
    r"\b(?:json|markdown|html|bullet(?:ed)?|highlight(?:ed|s)?|placeholders?|postscript|p\.\s*p?\.?\s*s\.?)\b",
    r"\bsections?\b",
    r"\btitle\b",
    r"<<|>>|double\s+angul?ar|angle\s+brackets?",
    r"\bquotation\s+marks?|\bdouble\s+quot",
    r"\bwrap(?:ped)?\b",
    r"\*\*\*|\bseparated\s+(?:by|with)\b|\bmarkdown\s+divider",
    r"\b(?:other|same|different|response|answer|entire)\s+language\b|\blanguage\s+(?:other|except)|"
    r"\b(?:in|only)\s+(?:french|german|hindi|spanish|italian|japanese|korean|chinese|"
    r"russian|arabic|portuguese|bengali|marathi|punjabi|tamil|telugu|urdu|gujarati|kannada|nepali|swahili|"
    r"thai|vietnamese|finnish|persian|farsi|turkish|polish|dutch|greek|hebrew)\b",
    r"\b(?:repeat|copy)\b.*\b(?:request|prompt|question|instruction)|\bword\s+for\s+word\b",
    rf"\b(?:two|2)\s+(?:different\s+)?{_RESPONSE}s\b|\b(?:six\s+)?asterisk\s+symbols\b",
    rf"\b(?:end|finish|conclude|start|begin)\s+(?:your|the|each|every|it)\s+(?:entire\s+)?(?:{_RESPONSE}|paragraph|"
    rf"sentence|section|with)",
    rf"\b(?:your|the|entire|whole)\s+(?:entire\s+|whole\s+)?{_RESPONSE}\s+(?:should|must|needs?|has|have|is|will|"
    rf"may|can|contains?|includes?)",
    r"\b(?:do\s+not|don't|never|avoid|without)\s+(?:use|using|include|including|mention|mentioning|say|saying|"
    r"write|writing|add|adding|any)\b",
    r"\b(?:include|including|use|using|mention|contain)s?\s+(?:the\s+(?:words?|keywords?|letters?|phrase)|"
    r"at\s+least|at\s+most|exactly|no\s+more|fewer|less)",
    r"\bmy\s+answer\s+is\b|\bchoose\s+from\b|\bfollowing\s+options\b",
    r"\bno\s+other\s+(?:language|words|text)\b",
    r"\b(?:is\s+there\s+anything\s+else|let\s+me\s+know)\b",
    r"\bfirst\s+word\b|\bparagraph\s+(?:#|number)?\s*\d\b",
    r"\bin\s+(?:your|the)\s+(?:entire\s+)?(?:response|answer|reply)\b",
    r"\b(?:first|second|third|fourth|fifth|last|final|\d+(?:st|nd|rd|th))\s+paragraph\b",
    r"\bvery\s+(?:end|beginning|start)\b|\bfollow\s+this\s+phrase\b",
    r"\b(?:mention|include|use|say)\s+[\"'“‘]",
    r"\b(?:at\s+least|at\s+most|only|exactly|more\s+than|less\s+than)\s+(?:once|twice|thrice)\b",
    r"\b(?:label|mark)(?:ed)?\s+(?:each|every|the|them|it|with)\b",
    r"\b(?:your|the)\s+(?:entire|whole)\s+(?:response|answer|output|reply)\b",
]
_CONSTRAINT = re.compile("|".join(f"(?:{p})" for p in CONSTRAINT_PATTERNS), re.IGNORECASE)
# English is the default: "Your response should be in English" is usually part of the task
_NOT_CONSTRAINT = re.compile(
    r"\b(?:your|the)\s+(?:entire\s+|whole\s+)?(?:response|answer|output|reply)\s+(?:should|must|will)\s+be\s+"
    r"(?:written\s+)?in\s+english\b",
    re.IGNORECASE,
)
# a quoted passage is material to work on, whatever it says
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”")
_PASSAGE_LENGTH = 60
_SENTENCE = re.compile(r".*?(?:[.!?]+[\"')\]]*(?=\s|$)|:(?=\s)|\n|$)")
# where a task sentence may turn into a constraint: conjunctions, commas, and the prepositions that
# usually open one ("... in all capital letters", "... of exactly 2 paragraphs", "... that uses ...")
_CLAUSE = re.compile(r"(?:[,;]\s*|\s+-\s+|\s+)(?=(?:and|but|while|also|then|plus)\b)|[,;]\s*", re.IGNORECASE)
_PHRASE = re.compile(
    r"(?:[,;]\s*|\s+-\s+|\s+)(?=(?:and|but|while|also|then|plus|in|of|with|without|using|that|which|"
    r"where|so\s+that|making|ensuring|including)\b)|[,;]\s*",
    re.IGNORECASE,
)
_TASK_OPENING = re.compile(
    r"(?:please\s+|can\s+you\s+|could\s+you\s+|now\s+|i\s+(?:want|need|would\s+like)\s+(?:you\s+)?(?:to\s+)?)?"
    r"(?:write|create|generate|rewrite|compose|give|describe|explain|summari[sz]e|draft|tell|list|provide|"
    r"come\s+up|design|plan|make\s+(?:a|an|me)|produce|suggest|name|help|imagine|pretend|elaborate|expand|"
    r"critique|translate|answer|what|why|how|who|when|where|is|are|do|does)\b",
    re.IGNORECASE,
)
_ABBREVIATIONS = re.compile(r"\b(?:P\.P\.S|P\.S|e\.g|i\.e|etc|Mr|Mrs|Dr|vs|U\.S)\.$", re.IGNORECASE)


def _sentences(text: str) -> list[CharSpan]:
    """Sentence spans (stripped), not cutting after abbreviations such as "P.S." or "e.g."."""
    spans: list[CharSpan] = []
    start = 0
    for match in _SENTENCE.finditer(text):
        end = match.end()
        if end == match.start():
            continue
        if _ABBREVIATIONS.search(text[start:end]) and end < len(text) and text[end : end + 1] != "\n":
            continue
        spans.append((start, end))
        start = end
    if start < len(text):
        spans.append((start, len(text)))
    return [_strip(text, s, e) for s, e in spans if text[s:e].strip()]


def _strip(text: str, start: int, end: int) -> CharSpan:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _phrases(text: str, start: int, end: int, cut: re.Pattern[str]) -> list[CharSpan]:
    cuts = [start] + [m.end() for m in cut.finditer(text, start, end)] + [end]
    return [_strip(text, a, b) for a, b in zip(cuts, cuts[1:]) if text[a:b].strip()]


def _constraint_part(text: str, masked: str, start: int, end: int, trim_end: bool) -> CharSpan:
    """The part of a sentence that constrains: from its first constraint phrase to the end, or, in a
    sentence that states the task (``trim_end``), to its last constraint phrase."""
    phrases = _phrases(text, start, end, _PHRASE if trim_end else _CLAUSE)
    flags = [bool(_CONSTRAINT.search(masked, a, b)) for a, b in phrases]
    if not any(flags) or flags[0]:
        return start, end
    first = flags.index(True)
    if len(text[start : phrases[first][0]].split()) <= 2:  # "First, ...", "Also, ...", "Make sure that ..."
        first = 0
    stop = end
    if trim_end:
        stop = phrases[len(flags) - 1 - flags[::-1].index(True)][1]
        if len(text[stop:end].split()) <= 3:  # a short tail ("... at least twice.") belongs to it
            stop = end
    return phrases[first][0], stop


def find_instruction_spans(prompt: str) -> list[CharSpan]:
    """``[start, end)`` character spans of ``prompt`` that state constraints on the response."""
    masked = _QUOTED.sub(_blank_passage, _NOT_CONSTRAINT.sub(_blank, prompt))
    found: list[CharSpan] = []
    sentences = _sentences(prompt)
    for index, (start, end) in enumerate(sentences):
        if not _CONSTRAINT.search(masked, start, end):
            continue
        span = _constraint_part(prompt, masked, start, end, trim_end=bool(_TASK_OPENING.match(prompt, start)))
        if prompt[end - 1] == ":" and index + 1 < len(sentences):
            # "... end with this exact phrase: Hope you agree." - what follows on the line is part of it
            after_start, after_end = sentences[index + 1]
            if "\n" not in prompt[end:after_start] and len(prompt[after_start:after_end].split()) <= 20:
                span = (span[0], after_end)
        found.append(span)
    return _merge(prompt, sorted(found))


def _blank(match: re.Match[str]) -> str:
    return " " * len(match.group())


def _blank_passage(match: re.Match[str]) -> str:
    return _blank(match) if len(match.group()) > _PASSAGE_LENGTH else match.group()


def _merge(text: str, spans: list[CharSpan]) -> list[CharSpan]:
    """Join spans separated only by whitespace or a list marker such as "2."."""
    merged: list[CharSpan] = []
    for start, end in spans:
        if merged and (start <= merged[-1][1] or len(text[merged[-1][1] : start].strip()) <= 3):
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def character_scores(
    texts: list[str], predicted: list[list[CharSpan]], gold: list[list[CharSpan]]
) -> tuple[float, float]:
    """Character-level precision and recall of predicted spans against gold (whitespace ignored)."""
    hits = predicted_total = gold_total = 0
    for text, pred, true in zip(texts, predicted, gold):
        pred_chars = {i for a, b in pred for i in range(a, b) if not text[i].isspace()}
        gold_chars = {i for a, b in true for i in range(a, b) if not text[i].isspace()}
        hits += len(pred_chars & gold_chars)
        predicted_total += len(pred_chars)
        gold_total += len(gold_chars)
    return hits / max(predicted_total, 1), hits / max(gold_total, 1)
