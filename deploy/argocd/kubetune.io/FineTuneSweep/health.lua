-- Argo CD health check for kubetune.io FineTuneSweep.
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

-- "Reason: message" of a condition, or the fallback.
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
  hs.message = "Waiting for the kubetune operator to reconcile the FineTuneSweep"
  return hs
end
if generation ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator: status is for generation " .. status.observedGeneration
    .. ", spec is at generation " .. generation
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = explain(condition(status, "Succeeded"), "Succeeded")
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = explain(condition(status, "Failed"), "Failed")
elseif phase == "Running" or phase == "Pending" then
  -- "TrialsRunning: 2 running, 3 of 8 finished; best so far ..." (the operator's own summary).
  hs.status = "Progressing"
  hs.message = explain(condition(status, "Running"), phase)
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. phase
end
return hs
