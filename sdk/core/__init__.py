"""The model itself: its architecture (`spec`), the model core (torch) every runtime starts from
(`model`), quantized weight storage (`quant`), infopt weight files (`weights`), the tokenizer,
and the numbers several stages share (`defaults`)."""
