// Render ```mermaid fences (emitted as <div class="mermaid">) in the browser.
import mermaid from "https://cdn.jsdelivr.net/npm/mermaid@11/dist/mermaid.esm.min.mjs";

mermaid.initialize({ startOnLoad: true });
