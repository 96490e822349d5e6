"""`loraforge demo`: the skill it teaches and scores (`skill`), its data (`data/`), and the run
on the embedded platform (`run`)."""
