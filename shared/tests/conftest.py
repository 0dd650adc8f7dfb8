import pytest

from shared import data
from shared.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def story_tokenizer():
    """A small byte-level BPE trained on 2,000 stories (a second or two)."""
    return train_tokenizer([s.text for s in data.StoryGenerator(7).samples(2000)], 400)
