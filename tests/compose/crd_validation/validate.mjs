// Reads a JSON array of Kubernetes objects on stdin and validates each against its CRD's
// OpenAPI schema (validators compiled from the CRDs by the kubernetes-models packages).
// Prints one line per object; exits non-zero naming the first object that fails.
import { readFileSync } from "node:fs";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";

const models = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor,
};

for (const doc of JSON.parse(readFileSync(0, "utf8"))) {
  const name = `${doc.kind}/${doc.metadata.name}`;
  const Model = models[`${doc.apiVersion}/${doc.kind}`];
  if (!Model) {
    console.error(`no CRD schema here for ${doc.apiVersion} ${doc.kind}`);
    process.exit(2);
  }
  try {
    new Model(doc).validate();
  } catch (error) {
    console.error(`${name}: ${error.message}`);
    process.exit(1);
  }
  console.log(`valid ${name}`);
}
