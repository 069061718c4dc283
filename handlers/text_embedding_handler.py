"""TorchServe handler: texts -> sentence embeddings, CPU tokenization pipelined with the GPU encoder.

A thin adapter: everything it does is `tandem_serve.torchserve.services.TextEmbeddingService`.
"""

from pathlib import Path

import ts.protocol.otf_message_handler as protocol
from ts.version import __version__ as torchserve_version
from ts.torch_handler.base_handler import BaseHandler

from tandem_serve.profiling import profile_thread
from tandem_serve.torchserve import frames
from tandem_serve.torchserve.replies import answer, request_headers
from tandem_serve.torchserve.services import TextEmbeddingService


class TextEmbeddingHandler(BaseHandler):
    """Settings come from the archive's model-config.yaml `handler:` section."""

    def initialize(self, context):
        properties = context.system_properties
        self.service = TextEmbeddingService(Path(properties["model_dir"]), context.model_yaml_config, properties.get("gpu_id"))
        if self.service.config.read_ahead:
            frames.install(protocol, torchserve_version)
        self.profile = profile_thread("text_embedding")  # TANDEM_STUB_PROFILE: this worker's main thread
        self.initialized = True

    def handle(self, data, context):
        self.profile.tick()
        return answer(context, self.service.handle(data, request_headers(context, len(data))))
