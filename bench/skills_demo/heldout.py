"""A held-out set of reworded and mixed prompts for measuring the skill gate (docs/reports/skills.md).

Written by hand before any gate design or tuning was tried, and never used to train a gate: the gate's training
phrasings live in :mod:`loramix.skills.phrasings`, and ``tests/test_skills_demo.py`` checks that no wording of
this file appears there. The set covers the three demo skills (``sentiment``: SST-2, ``summary``: DialogSum,
``boolq``: BoolQ questions).

* ``REWORDED``: per skill, ten instructions that ask for the skill in words other than its training template
  (instruction before or after the text, quoted or not, conversational, terse). ``{text}`` is filled with the
  raw held-out item of the skill's TEST split (an SST-2 test sentence, a DialogSum test dialogue, a BoolQ test
  question without its question mark); item ``i`` takes instruction ``i % 10``.
* ``MIXED``: instructions that ask for two skills at once, filled with test-split text of the ``source`` skill;
  item ``i`` of a source takes that source's instruction ``i % n``.
* ``MIXED_FREE``: complete prompts written with their own text (the four example requests of the report among
  them), each with the skills it asks for.
* ``SINGLE_FREE``: complete single-skill prompts in everyday wording about other domains (emails, app reviews,
  meetings, general knowledge).
"""

from __future__ import annotations

REWORDED: dict[str, list[str]] = {
    "sentiment": [
        "Did the writer of this like the movie or not? \"{text}\"",
        "{text}\nIs that a positive or a negative opinion?",
        "Rate the tone of this film critique as good or bad: {text}",
        "Here's a snippet from a review: \"{text}\" How does the reviewer feel about the film?",
        "Tell me if this comment about a movie is favourable or unfavourable: {text}",
        "Positive or negative? {text}",
        "Judge the attitude expressed in this line: {text}",
        "\"{text}\" -- thumbs up or thumbs down?",
        "I read this in a newspaper review: {text}. Was the critic pleased?",
        "What opinion does this sentence express, approving or critical?\n{text}",
    ],
    "summary": [
        "Can you boil this conversation down to a sentence or two?\n{text}",
        "{text}\n\nWhat was this chat about, in short?",
        "Write a brief recap of the following exchange.\n{text}",
        "My colleagues had this conversation. Give me the gist:\n{text}",
        "Condense this transcript into one line:\n{text}",
        "{text}\nSum up what the two people discussed.",
        "Here is a phone call transcript. Recap it briefly for someone who missed it.\n{text}",
        "Short synopsis of this exchange, please:\n{text}",
        "In a sentence, what happens here?\n{text}",
        "{text}\n\nCompress the above dialogue into a short note.",
    ],
    "boolq": [
        "Quick yes/no check: {text}?",
        "{text}? true or false please",
        "I'm wondering: {text}? Just say true or false.",
        "Fact check (answer true/false): {text}",
        "Settle a bet for me -- {text}?",
        "Is it correct that the answer to \"{text}\" is yes?",
        "Respond with yes or no only. {text}?",
        "trivia time: {text}?",
        "Can you confirm or deny this: {text}?",
        "{text} -- is that so?",
    ],
}

# (skills asked for, the skill whose test text fills {text}, instruction)
SS, SB, MB = ("sentiment", "summary"), ("sentiment", "boolq"), ("summary", "boolq")
MIXED: list[tuple[tuple[str, ...], str, str]] = [
    (SS, "sentiment",
     "Sum up this review in a few words and say if it's positive or negative: {text}"),
    (SS, "sentiment",
     "What's the gist of this critique, and did the critic like the film? \"{text}\""),
    (SS, "sentiment",
     "{text}\nGive me a one-line summary of this opinion and its overall tone."),
    (SS, "summary",
     "Summarize this conversation and tell me whether #Person2# is happy or upset:\n{text}"),
    (SS, "summary",
     "{text}\n\nGive a short recap of the chat and its overall mood."),
    (SS, "summary",
     "Briefly recap this dialogue, then say if it ends on a positive or negative note.\n{text}"),
    (SB, "sentiment",
     "Answer true or false, and say how the writer feels: the reviewer recommends the film. \"{text}\""),
    (SB, "sentiment",
     "{text}\nTrue or false: this critic enjoyed the movie? Also label the sentiment."),
    (MB, "summary",
     "{text}\n\nSummarize this and answer true or false: the two speakers agree."),
    (MB, "summary",
     "Give me the gist of this chat, and yes or no: does #Person1# get what they want?\n{text}"),
    (MB, "boolq",
     "Explain the background briefly in a short summary, then answer true or false: {text}?"),
    (SB, "boolq",
     "Answer yes or no: {text}? And tell me whether the question sounds positive or negative."),
]

MIXED_FREE: list[tuple[tuple[str, ...], str]] = [
    (("sentiment", "summary"),
     "Customer message:\n\"I waited 3 days for delivery. The product quality is good but your support team never "
     "replied. Can you summarize my issue and note the overall sentiment?\""),
    (("sentiment", "summary"),
     "Give a short summary and highlight the tone:\n\"The laptop performance is great, but battery lasts only 3 "
     "hours.\""),
    (("sentiment", "summary"),
     "Summarise this hotel review and tell me if it is positive: \"The room was spotless and the staff were "
     "friendly, but the walls were paper-thin and we barely slept.\""),
    (("sentiment", "summary"),
     "Here is feedback from our survey: \"Checkout was quick, delivery took forever, and the shoes pinch.\" "
     "Condense it to one line and say how the customer feels."),
    (("sentiment", "summary"),
     "#Person1#: Sorry your order arrived late.\n#Person2#: That's fine, the food was still warm and delicious. "
     "Thanks!\nRecap this exchange and tell me if the customer is satisfied."),
    (("sentiment", "summary"),
     "Read this email and give me a two-line digest plus the writer's mood: \"Hi team, the launch slipped again. "
     "I'm frustrated, but the demo looked solid and the client seemed interested.\""),
    (("sentiment", "summary"),
     "TL;DR and vibe check please: \"Concert was loud, crowded and overpriced, but the band played every song I "
     "wanted.\""),
    (("sentiment", "summary"),
     "#Person1#: The new schedule is a disaster.\n#Person2#: Agreed, nobody gets a weekend off now.\n"
     "What did they talk about, and are they happy with it?"),
    (("summary", "boolq"),
     "#Person1#: Is the museum open on Mondays?\n#Person2#: No, only Tuesday to Sunday.\nSummarize the "
     "exchange, then answer true or false: the museum opens on Mondays."),
    (("summary", "boolq"),
     "Briefly summarize what the Great Barrier Reef is, and answer yes or no: is it visible from space?"),
    (("summary", "boolq"),
     "#Person1#: Did you finish the report?\n#Person2#: Not yet, I need one more day.\nGive me the gist and tell "
     "me true or false: the report is done."),
    (("summary", "boolq"),
     "In short, what is photosynthesis about, and is it true that plants need sunlight for it?"),
    (("sentiment", "boolq"),
     "True or false: the customer would buy again. Also, is the tone positive or negative? \"Never ordering "
     "from this shop again, the parcel arrived broken.\""),
    (("sentiment", "boolq"),
     "\"Absolutely loved the sequel, even better than the first one.\" Did the writer enjoy it (yes/no), and "
     "what is the sentiment?"),
    (("sentiment", "boolq"),
     "Label the feeling of this tweet and answer true or false: the author is complaining. \"My train was "
     "cancelled again, great start to the week.\""),
    (("sentiment", "boolq"),
     "Is this review favourable, and yes or no, does it mention the price? \"Tasty food, friendly waiter, fair "
     "prices.\""),
]

SINGLE_FREE: list[tuple[str, str]] = [
    ("sentiment", "Classify the sentiment of this email:\n\"I'm extremely disappointed. I paid for premium but got "
                  "basic features.\""),
    ("sentiment", "How does this customer feel? \"The delivery guy was rude and the box was soaking wet.\""),
    ("sentiment", "Is this app store rating text happy or unhappy: \"Works perfectly, five stars!\""),
    ("sentiment", "\"Best purchase I've made all year.\" Positive or negative feedback?"),
    ("summary", "Summarize this app store review in one line:\n\"The UI looks beautiful and payments are smooth, "
                "but the app crashes frequently on Android 13 and notifications don't work.\""),
    ("summary", "#Person1#: We need the slides by Friday.\n#Person2#: I'll draft them tomorrow and send them to "
                "Jo for review.\nShort recap please."),
    ("summary", "Condense the following meeting notes into one sentence: budget approved, hiring paused until "
                "March, new office opens in May, Sam leads the migration."),
    ("summary", "#Person1#: Where did you park?\n#Person2#: Behind the bakery, the lot was full.\n#Person1#: "
                "Okay, I'll meet you there.\nWhat's the short version of this chat?"),
    ("boolq", "Is the Pacific the largest ocean on Earth? Answer true or false."),
    ("boolq", "true/false: a tomato is a fruit"),
    ("boolq", "Do penguins live at the North Pole? yes or no"),
    ("boolq", "Quick question, can you see the Great Wall of China from the Moon?"),
]
