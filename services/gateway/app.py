"""The gateway's Gradio app: Chat, Images, Fine-tune and System tabs over the services' gRPC APIs.

`build_app` takes its clients (no globals), so tests and the command line build it the same way.
"""

from __future__ import annotations

import gradio as gr

from services.gateway.chat import build_chat_tab
from services.gateway.clients import ServiceClients
from services.gateway.finetune import build_finetune_tab
from services.gateway.images import ImageFiles, build_images_tab
from services.gateway.system import build_system_tab

TITLE = "ModelWorks"


def build_app(clients: ServiceClients, files: ImageFiles) -> gr.Blocks:
    limit = clients.config.concurrency_limit
    private = {"api_visibility": "private"}
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {TITLE}\nChat, make images and fine-tune adapters on this server's models.")
        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat = build_chat_tab(clients, limit)
            with gr.Tab("Images", id="images", elem_id="tab-images"):
                images = build_images_tab(clients, files, limit)
            with gr.Tab("Fine-tune", id="finetune", elem_id="tab-finetune") as finetune_tab:
                finetune = build_finetune_tab(clients, limit)
            with gr.Tab("System", id="system", elem_id="tab-system") as system_tab:
                system = build_system_tab(clients)

        # Each tab fills itself on page load, separately, so one stopped service leaves the others usable.
        app.load(chat.refresh_pickers, chat.pickers[:2], chat.pickers, **private)
        app.load(images.refresh_pickers, images.pickers, images.pickers, **private).then(
            images.model_defaults, images.pickers[:1], images.defaults, **private
        )
        # ... and again each time it is opened, so what it shows is current without waiting for its timer
        for tab, loader in ((finetune_tab, finetune.loader), (system_tab, system.loader)):
            app.load(loader.fn, loader.inputs, loader.outputs, show_progress="hidden", **private)
            tab.select(loader.fn, loader.inputs, loader.outputs, show_progress="hidden", **private)
        app.unload(finetune.forget)
        # a job that just succeeded changes the adapters Chat offers and System lists
        finetune.finished_adapter.change(chat.refresh_pickers, chat.pickers[:2], chat.pickers, **private)
        finetune.finished_adapter.change(
            system.loader.fn, system.loader.inputs, system.loader.outputs, show_progress="hidden", **private
        )

        def tab_timers(event: gr.SelectData):
            """Poll only what is on screen: the jobs table on Fine-tune, the tables on System."""
            return gr.Timer(active=event.value == "Fine-tune"), gr.Timer(active=event.value == "System")

        tabs.select(tab_timers, None, [finetune.timer, system.timer], **private)

        def open_chat(adapter):
            _, base_model, name = adapter
            return gr.Tabs(selected="chat"), *chat.refresh_pickers(base_model, name)

        def open_images(adapter):
            _, base_model, name = adapter
            return gr.Tabs(selected="images"), *images.refresh_pickers(base_model, name, None)

        finetune.use_in_chat.click(open_chat, [finetune.finished_adapter], [tabs, *chat.pickers], **private)
        finetune.use_in_images.click(open_images, [finetune.finished_adapter], [tabs, *images.pickers], **private).then(
            images.model_defaults, images.pickers[:1], images.defaults, **private
        )
    return app
