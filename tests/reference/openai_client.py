"""The official OpenAI Python SDK as a client of `icedit serve` (tests/.../openai_sdk.rs runs it).

Usage: openai_client.py BASE_URL API_KEY PHOTO OUT_DIR

Edits PHOTO through `client.images.edit` exactly as an app would (icedit's own fields in
`extra_body`), writes each returned image to OUT_DIR/sdk-{i}.png, and checks that a bad request
raises the SDK's BadRequestError and a wrong key its AuthenticationError.
"""

import base64
import os
import sys

import openai


def main() -> None:
    base_url, api_key, photo, out_dir = sys.argv[1:5]
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0)
    with open(photo, "rb") as image:
        result = client.images.edit(
            model="icedit",
            image=image,
            prompt="make it night",
            n=2,
            size="64x48",
            response_format="b64_json",
            user="sdk-test",
            extra_body={"seed": 7, "steps": 3},
        )
    assert len(result.data) == 2, result
    for i, item in enumerate(result.data):
        with open(os.path.join(out_dir, f"sdk-{i}.png"), "wb") as f:
            f.write(base64.b64decode(item.b64_json))

    # Errors arrive as the SDK's exceptions, with the server's message.
    with open(photo, "rb") as image:
        try:
            client.images.edit(image=image, prompt="   ", extra_body={"steps": 3})
        except openai.BadRequestError as e:
            assert "prompt" in str(e), e
        else:
            raise AssertionError("an empty prompt was accepted")
    wrong = openai.OpenAI(base_url=base_url + "/v1", api_key="not-the-key-000000", max_retries=0)
    with open(photo, "rb") as image:
        try:
            wrong.images.edit(image=image, prompt="make it night")
        except openai.AuthenticationError:
            pass
        else:
            raise AssertionError("a wrong key was accepted")
    print("openai", openai.__version__, "ok")


if __name__ == "__main__":
    main()
