"""Chat templates loraforge needs at run time: only for base models that ship without one.

Every other family's official template comes with its tokenizer; copies used by the tests live
in tests/templates/. Gemma 3 270M on the package registry is the base model, whose GGUF has no
template, so the converted model gets Gemma 3's own (tokenizer_config.json of
google/gemma-3-*-it): the tokenizer already has <start_of_turn> (105) and <end_of_turn> (106),
trained as ordinary tokens in the base model, so no new embeddings are needed.
"""

# Gemma 3's template, text-only parts (the image branch is dropped: loraforge is text only).
# It has no system role: a system message goes in front of the first user turn.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    '{%- set first_user_prefix = "" -%}'
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}"
    '{%- set role = "model" -%}'
    "{%- else -%}"
    "{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)
