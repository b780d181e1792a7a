"""CLI: python -m data.tokenizer train --input FILES --text-field text --vocab-size N --output X.model"""
from data.tokenizer.train import main

main()
