// Front-end extension of comfyui-perfusion (served through WEB_DIRECTORY).
import { app } from "../../scripts/app.js";

app.registerExtension({ name: "perfusion.core" });
