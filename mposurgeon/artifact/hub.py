"""Pushing a written output to the Hugging Face Hub (`--push-to-hub REPO`).

The repository id is checked when the options are read, and the client's offline mode and
token before any work, so that a typo fails at once rather than after an hour of training.
The push itself comes last, once the output is written and verified: `huggingface_hub`
creates the repository if need be (`HfApi.create_repo`, `exist_ok`) and uploads the folder
in one commit (`HfApi.upload_folder`); the token is whatever the client finds (HF_TOKEN, the
`hf auth login` cache). A push that fails never touches the output: the error says where it
is and how to push it by hand.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from pydantic import BaseModel, Field, field_validator, model_validator

from mposurgeon._version import __version__
from mposurgeon.artifact.resolve import offline_from_env  # HF_HUB_OFFLINE as set now
from mposurgeon.errors import MposurgeonError, UsageError, one_line


class PushError(MposurgeonError):
    """A push to the Hub that failed after the output was written (which stays): exit 1."""

    def __init__(self, message: str, hint: str, output: Path, repo_id: str) -> None:
        super().__init__(message, hint)
        self.output = output
        self.repo_id = repo_id


class PushOptions(BaseModel):
    """The options of a stage that can push its output (`merge`, `train`). They say where the
    output goes, not what it is: the manifest does not record them (`exclude`)."""

    push_to_hub: str | None = Field(
        None, exclude=True, description="Hub repository (namespace/name) to upload the output to"
    )
    private: bool = Field(
        False, exclude=True, description="create the repository private (if it is new)"
    )

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        return None if value is None else check_repo_id(value)

    @model_validator(mode="after")
    def _private_needs_push(self) -> PushOptions:
        if self.private and self.push_to_hub is None:
            raise ValueError("--private applies to the repository of --push-to-hub: give both")
        return self


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a valid Hub model id (`name` or `namespace/name`), else ValueError
    with the reason (for an options validator: "invalid option --push-to-hub: ...")."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{repo_id!r} is not a Hub repository id: {one_line(err)}") from None
    return repo_id


def check_can_push(repo_id: str) -> None:
    """Refuse, before any work, a push the client cannot make: offline mode, or no token.
    (A token it finds may still be refused by the Hub: that shows at the push.)"""
    import huggingface_hub

    if offline_from_env():
        raise UsageError(
            f"--push-to-hub {repo_id}: the Hugging Face client is offline (HF_HUB_OFFLINE)",
            hint="unset HF_HUB_OFFLINE to push, or leave --push-to-hub out and run "
            f"`hf upload {repo_id} OUTPUT` later",
        )
    try:
        token = huggingface_hub.get_token()
    except Exception:  # a token exchange (HF_OIDC_RESOURCE) that failed: the push will tell
        return
    if token is None:
        raise UsageError(
            f"--push-to-hub {repo_id}: no Hugging Face token found",
            hint="run `hf auth login`, or set HF_TOKEN to a token with write access",
        )


def commit_message(stage: str) -> str:
    """The message of the commit that uploads the output of `stage`."""
    return f"mposurgeon {__version__}: upload the output of {stage}"


def push_folder(folder: Path, repo_id: str, *, private: bool, stage: str) -> str:
    """Create the model repository `repo_id` if it does not exist (`private` for a new one)
    and upload every file of `folder`, the output of `stage`, to it in one commit; return
    the commit's URL.

    Raises PushError (one line: what failed, where the output is, how to push it by hand)
    on any failure of the client: no or a refused token, offline, the network, the Hub."""
    from huggingface_hub import HfApi

    folder = Path(folder).resolve()
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message(stage)
        )
    except Exception as err:  # the client's errors have no common base (HTTP, OS, values)
        raise PushError(
            f"the push to {repo_id} failed ({type(err).__name__}: {one_line(err, 200)}); "
            f"the output is kept at {folder}",
            hint=f"push it by hand: hf upload {shlex.quote(repo_id)} {shlex.quote(str(folder))}",
            output=folder,
            repo_id=repo_id,
        ) from err
    return str(info.commit_url)
