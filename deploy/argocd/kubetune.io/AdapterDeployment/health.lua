-- Argo CD health check for kubetune.io AdapterDeployment.
-- Uses only Lua's base and table libraries: Argo CD runs argocd-cm customizations without
-- the string and math libraries unless useOpenLibs is set.
local hs = {}

local function condition(status, type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function explain(c, fallback)
  if c == nil then
    return fallback
  end
  if c.message ~= nil and c.message ~= "" then
    if c.reason ~= nil and c.reason ~= "" then
      return c.reason .. ": " .. c.message
    end
    return c.message
  end
  if c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local status = obj.status
local generation = obj.metadata.generation
if status == nil or status.phase == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to reconcile the AdapterDeployment"
  return hs
end
if generation ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator: status is for generation " .. status.observedGeneration
    .. ", spec is at generation " .. generation
  return hs
end

local resolved = condition(status, "AdaptersResolved")
local available = condition(status, "Available")
local phase = status.phase
if phase == "Ready" then
  hs.status = "Healthy"
  local adapters = status.readyAdapters or "all"
  hs.message = "Ready: " .. adapters .. " adapters served"
  if status.endpoint ~= nil then
    hs.message = hs.message .. " at " .. status.endpoint
  end
elseif phase == "Degraded" then
  hs.status = "Degraded"
  -- Why it is degraded: a failed FineTuneJob, else the server itself (Available=False:
  -- ServerUnavailable, ProgressDeadlineExceeded, ReplicaFailure), not an adapter still waiting.
  if resolved ~= nil and resolved.status == "False" and resolved.reason == "FineTuneJobFailed" then
    hs.message = explain(resolved, "Degraded")
  elseif available ~= nil and available.status == "False" then
    hs.message = explain(available, "Degraded")
  elseif resolved ~= nil and resolved.status == "False" then
    hs.message = explain(resolved, "Degraded")
  else
    hs.message = explain(available, "Degraded")
  end
elseif phase == "Progressing" or phase == "Pending" then
  hs.status = "Progressing"
  if resolved ~= nil and resolved.status == "False" then
    hs.message = explain(resolved, phase)
  else
    hs.message = explain(available, phase)
  end
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. phase
end
return hs
