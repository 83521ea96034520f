{{- define "kubetune.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.labels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator's permissions: exactly what its reconcilers and watches use. */}}
{{- define "kubetune.rules" -}}
# FineTuneJobs, AdapterDeployments and FineTuneSweeps: watch them, write only their status,
# delete a FineTuneJob whose ttlSecondsAfterFinished expired.
- apiGroups: [kubetune.io]
  resources: [finetunejobs, adapterdeployments]
  verbs: [get, list, watch, delete]
- apiGroups: [kubetune.io]
  resources: [finetunesweeps]
  verbs: [get, list, watch]
# A FineTuneSweep's trials are FineTuneJobs it owns: created, and suspended when pruned.
- apiGroups: [kubetune.io]
  resources: [finetunejobs]
  verbs: [create, patch]
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status, adapterdeployments/status, finetunesweeps/status]
  verbs: [get, patch]
# Children's ownerReferences set blockOwnerDeletion, which clusters with the
# OwnerReferencesPermissionEnforcement admission plugin (e.g. OpenShift) allow only to
# whoever may update the owner's finalizers. The operator never sets a finalizer.
- apiGroups: [kubetune.io]
  resources: [finetunejobs/finalizers, adapterdeployments/finalizers, finetunesweeps/finalizers]
  verbs: [update]
# Children (created and converged with server-side apply).
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [configmaps, services, serviceaccounts]
  verbs: [get, create, patch, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create, patch, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, create, patch, delete]
# An AdapterDeployment's optional spec.networkPolicy.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, patch, delete]
# Training pods: phase, exit codes, scheduling failures.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# Events on the objects it manages.
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
