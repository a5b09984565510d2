"""Constants shared by the training tests."""

LABELS = ("neg", "pos", "mixed")

TEXTS = [
    "a wonderful, moving film",
    "dull and far too long",
    "the cast is great but the plot drags",
    "i loved every minute",
    "a waste of two hours",
    "funny in places, flat in others",
    "brilliant direction and a sharp script",
    "painfully boring",
    "not bad, not great either",
    "an instant classic",
    "the worst movie this year",
    "some good ideas, poorly executed",
]
