"""A development set of reworded and mixed prompts for choosing between gate designs (docs/reports/skills.md).

Gate designs are compared on this set; :mod:`bench.skills_demo.heldout` is kept for the final measurement of the
chosen design. The two sets are written independently: no instruction here appears in the held-out set or in
the training phrasings (``tests/test_skills_gate.py`` checks both). The ``{text}`` slots are filled with test
items from the END of each skill's shuffled test split (``demo.dev_items``), while the held-out measurements
take items from its start, so the two sets never share a text.

* ``DEV_REWORDED``: per skill, six instructions in other words than the skill's training template.
* ``DEV_MIXED``: instructions asking for two skills, filled with text of the ``source`` skill.
* ``DEV_MIXED_FREE``: complete prompts asking for two skills, with their own text.
"""

from __future__ import annotations

DEV_REWORDED: dict[str, list[str]] = {
    "sentiment": [
        "Would you say the person who wrote this enjoyed the film? {text}",
        "{text}\n\nFavourable or unfavourable?",
        "Here's what a critic wrote: \"{text}\". Praise or criticism?",
        "Work out whether this movie comment is upbeat or downbeat: {text}",
        "{text} -- good review or bad review?",
        "Mood of this line about a film (positive/negative)?\n{text}",
    ],
    "summary": [
        "Give me the short version of this talk:\n{text}",
        "{text}\n\nWhat's the takeaway from this exchange, in a sentence?",
        "Please shorten this conversation to its essentials.\n{text}",
        "Someone asked me what these two discussed. Help me explain it briefly:\n{text}",
        "{text}\nNow recap the whole thing in a line or two.",
        "Distil the following chat into a brief note:\n{text}",
    ],
    "boolq": [
        "Real quick, {text}? (true/false)",
        "{text}? Give me a one-word answer, true or false.",
        "Help me out with a yes/no: {text}?",
        "Is this right or wrong -- {text}?",
        "My friend claims the answer is yes: {text}? Correct?",
        "Yes/no quiz question: {text}?",
    ],
}

_SS, _SB, _MB = ("sentiment", "summary"), ("sentiment", "boolq"), ("summary", "boolq")
DEV_MIXED: list[tuple[tuple[str, ...], str, str]] = [
    (_SS, "sentiment", "Shorten this movie comment to a few words and tell me if the critic approved: {text}"),
    (_SS, "sentiment", "{text}\n\nWhat does this line say, briefly, and is it praise or criticism?"),
    (_SS, "summary", "Recap this talk in a sentence and tell me the mood of the speakers:\n{text}"),
    (_SS, "summary", "{text}\nWhat's the short version, and did it end on a good or bad note?"),
    (_SB, "sentiment", "Is the critic happy with the film (true/false)? Also give the tone of the review. {text}"),
    (_SB, "boolq", "{text}? Answer yes or no, and tell me if the question sounds upbeat or downbeat."),
    (_MB, "summary", "Give me the short version of this chat, then true or false: they make a plan.\n{text}"),
    (_MB, "boolq", "Some quick background in a sentence, and then a yes/no answer: {text}?"),
]

DEV_MIXED_FREE: list[tuple[tuple[str, ...], str]] = [
    (("sentiment", "summary"),
     "Support ticket: \"My refund was approved after two weeks, but nobody explained the delay.\" Give me the "
     "short version and tell me how annoyed the customer is."),
    (("sentiment", "summary"),
     "#Person1#: The trip was a mess, the flight got cancelled.\n#Person2#: But the beach was amazing once we got "
     "there.\nWhat happened, in short, and was it a good trip overall?"),
    (("sentiment", "summary"),
     "Boil this product review down to a line and say if it's a thumbs up: \"Sturdy, quiet and easy to set up; "
     "a bit pricey, though.\""),
    (("sentiment", "summary"),
     "Here's a note from a colleague: \"The client loved the pitch, but legal wants three more weeks.\" Brief "
     "recap plus the overall feeling, please."),
    (("summary", "boolq"),
     "#Person1#: Can I pay by card?\n#Person2#: Only cash, sorry.\nShort recap, then true or false: the shop "
     "takes cards."),
    (("summary", "boolq"),
     "Explain in a couple of sentences what a solar eclipse is, and yes or no: can it happen at night?"),
    (("sentiment", "boolq"),
     "\"The soup was cold and the waiter ignored us.\" Is this a complaint (yes/no), and what's the tone?"),
    (("sentiment", "boolq"),
     "Positive or negative, and true or false: the writer mentions a price. \"Great value for ten dollars, "
     "would order again.\""),
]
