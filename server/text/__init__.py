"""Text in and out, wherever it is needed: checks and tokenization of input text (`input.py`), and
detokenization: a tokenizer's table (`table.py`) and text deltas with stop strings (`stream.py`).

The API processes tokenize requests and turn plain rows' token ids into text; the engine makes the text
of the rows it must read (stop strings) and the final text of every request.
"""
